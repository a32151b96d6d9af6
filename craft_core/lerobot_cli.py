"""lerobot's own CLIs on craft checkpoints, including the tiny offline demo policies.

A train-stage checkpoint is a lerobot policy folder: for hub-sized policies plain
``lerobot-eval --policy.path=<checkpoint>`` loads it (and a LoRA checkpoint through lerobot's PEFT
path). The tiny demo policies are real lerobot classes at sizes lerobot hard-codes differently, so
lerobot can only build them inside their folder plugin's loading context. This module runs
lerobot's unmodified ``lerobot-eval`` entry point inside that context:

    python -m craft_core.lerobot_cli eval --policy.path=<checkpoint> --env.type=pusht --eval.n_episodes=1 ...

For a folder that needs no plugin it is exactly ``lerobot-eval`` with the same arguments.
:func:`eval_command` gives the command line for a checkpoint.
"""

import shlex
import sys
from pathlib import Path

from craft_core.policy_io import folder_plugin, policy_loading_context


def _policy_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--policy.path="):
            return arg.split("=", 1)[1]
        if arg == "--policy.path" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _base_path(path: str | None) -> str | None:
    """The base policy of a PEFT checkpoint (what needs the loading context), else ``path``."""
    if path is None:
        return None
    adapter = Path(path) / "adapter_config.json"
    if adapter.is_file():
        import json

        return json.loads(adapter.read_text()).get("base_model_name_or_path") or path
    return path


def eval_command(checkpoint: str | Path, *args: str) -> str:
    """The command that runs lerobot-eval on ``checkpoint`` (with craft's loading context when it needs one)."""
    path = str(checkpoint)
    needs_context = folder_plugin(path) is not None or folder_plugin(_base_path(path)) is not None
    prefix = [sys.executable, "-m", "craft_core.lerobot_cli", "eval"] if needs_context else ["lerobot-eval"]
    return shlex.join([*prefix, f"--policy.path={path}", *args])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "eval":
        print("usage: python -m craft_core.lerobot_cli eval --policy.path=<checkpoint> [lerobot-eval options]",
              file=sys.stderr)
        return 2
    from lerobot.scripts import lerobot_eval

    path = _policy_path(argv[1:])
    config_args, step_overrides = _local_tokenizers(path)
    sys.argv = ["lerobot-eval", *argv[1:], *config_args]
    make_processors = lerobot_eval.make_pre_post_processors

    def with_local_tokenizers(*args, preprocessor_overrides=None, **kwargs):
        merged = {step: dict(fields) for step, fields in (preprocessor_overrides or {}).items()}
        for step, fields in step_overrides.items():
            merged.setdefault(step, {}).update(fields)
        return make_processors(*args, preprocessor_overrides=merged, **kwargs)

    lerobot_eval.make_pre_post_processors = with_local_tokenizers
    try:
        with policy_loading_context(_base_path(path)):
            lerobot_eval.main()
    finally:
        lerobot_eval.make_pre_post_processors = make_processors
    return 0


def _local_tokenizers(path: str | None) -> tuple[list[str], dict[str, dict]]:
    """``--policy.<field>=`` arguments and processor-step overrides that point a plugin folder's
    tokenizer-loading fields at the folder's own copies: a checkpoint records the absolute paths
    it was trained with, which no longer exist once it (or its source folder) has moved. Craft's
    own loader applies the same overrides (``craft_core.policy_io``). Nothing for other folders."""
    plugin = folder_plugin(path)
    if plugin is None:
        return [], {}
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import get_policy_class  # noqa: F401  (registers every config class)

    folder = Path(path)
    cfg = PreTrainedConfig.from_pretrained(str(folder))
    overrides = plugin.config_overrides(folder, cfg)  # only fields whose recorded path is gone
    for field, value in overrides.items():
        setattr(cfg, field, value)
    return [f"--policy.{field}={value}" for field, value in overrides.items()], plugin.processor_overrides(folder, cfg)


if __name__ == "__main__":
    sys.exit(main())
