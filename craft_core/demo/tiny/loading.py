"""The tiny-folder plugin of ``craft_core.policy_io``: how a tiny offline policy folder loads.

``craft_core.policy_io`` knows nothing about tiny policies. It asks the plugins registered under
the entry-point group ``craft.policy_folders`` (pyproject.toml) whether they recognise a local
folder; this one recognises folders carrying ``craft_tiny.json`` (or checkpoints whose
``config.json`` points at the tokenizers of such a folder) and tells policy_io

- the context to load them in: ``tiny_lerobot_models`` (pi0_fast hard-codes its backbone size);
- the config fields to re-point when the folder has moved: tiny folders reference their local
  tokenizer folders by absolute path (lerobot resolves relative names against the working
  directory), so a moved folder uses ``<folder>/tokenizers/...``;
- the processor step overrides that point every tokenizer-loading step at those folders;
- the files a checkpoint saved from such a policy must carry to load on its own
  (``craft_tiny.json`` and ``tokenizers/``).
"""

import json
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

from craft_core.demo.tiny.common import TOKENIZERS_DIR, copy_tiny_marker, read_tiny_spec

CONFIG_NAME = "config.json"
PREPROCESSOR_FILE = "policy_preprocessor.json"  # lerobot's name for the saved preprocessor pipeline


def _tokenizer_fields(policy_type: str | None) -> dict[str, list[tuple[str, str]]]:
    from craft_core.demo.tiny.build import supported_tiny_policy_types, tiny_module

    if policy_type not in supported_tiny_policy_types():
        return {}
    return getattr(tiny_module(policy_type), "TOKENIZER_FIELDS", {})


def tiny_spec_of(path: str | Path | None) -> dict | None:
    """``craft_tiny.json`` governing a local folder, or None (hub ids, full-size folders).

    Looked for in the folder itself, then in the tiny folders its ``config.json`` points to (a
    checkpoint of a fine-tuned tiny policy references the teacher's tokenizer folders).
    """
    if path is None:
        return None
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return None
    spec = read_tiny_spec(folder)
    if spec is not None:
        return spec
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    for field in _tokenizer_fields(config.get("type")):
        value = config.get(field)
        if not value or not Path(value).is_absolute():
            continue
        # <tiny folder>/tokenizers/<name>: the marker sits two levels up.
        for ancestor in list(Path(value).parents)[:2]:
            spec = read_tiny_spec(ancestor)
            if spec is not None:
                return spec
    return None


class TinyPolicyFolders:
    """The ``craft.policy_folders`` plugin for tiny offline policies (see the module docstring)."""

    name = "tiny"

    def recognises(self, folder: Path) -> bool:
        return tiny_spec_of(folder) is not None

    @contextmanager
    def loading_context(self, folder: Path) -> Iterator[dict | None]:
        from craft_core.demo.tiny.patching import tiny_lerobot_models

        spec = tiny_spec_of(folder)
        with tiny_lerobot_models(spec) if spec is not None else nullcontext():
            yield spec

    def config_overrides(self, folder: Path, config: Any) -> dict[str, str]:
        """Tokenizer fields to re-point at ``folder``'s own copies when the recorded ones are gone."""
        spec = tiny_spec_of(folder)
        if spec is None:
            return {}
        relative = spec.get("tokenizers", {})
        overrides = {}
        for field in _tokenizer_fields(spec["policy_type"]):
            current = getattr(config, field, None)
            if current and Path(current).exists():
                continue
            if field in relative and (folder / relative[field]).exists():
                overrides[field] = str(folder / relative[field])
            elif current:
                raise FileNotFoundError(
                    f"tiny policy {folder}: {field}={current!r} does not exist and the folder has no "
                    f"{relative.get(field, 'tokenizers/...')}; rebuild it with craft_core.demo.tiny.build_tiny_policy"
                )
        return overrides

    def processor_overrides(self, folder: Path, config: Any) -> dict[str, dict]:
        """Every processor step that loads a tokenizer, pointed at the policy's own local folder."""
        overrides: dict[str, dict] = {}
        for field, steps in _tokenizer_fields(config.type).items():
            for step, step_field in steps:
                overrides.setdefault(step, {})[step_field] = getattr(config, field)
        return overrides

    def carry_files(self, source_folder: Path, pretrained_dir: Path) -> None:
        """A checkpoint saved from a tiny policy needs its marker and tokenizers to load on its own."""
        if not copy_tiny_marker(source_folder, pretrained_dir):
            return
        tokenizers = Path(source_folder) / TOKENIZERS_DIR
        if tokenizers.is_dir():
            shutil.copytree(tokenizers, pretrained_dir / TOKENIZERS_DIR, dirs_exist_ok=True)
        # The source folder's tokenizers, as the checkpoint's config.json already references them: the
        # checkpoint itself is written under a temporary name and renamed when complete.
        record_tokenizer_paths(Path(pretrained_dir), read_tiny_spec(Path(pretrained_dir)), Path(source_folder))


def record_tokenizer_paths(folder: Path, spec: dict | None, tokenizer_root: Path | None = None) -> None:
    """Write into ``folder``'s saved preprocessor, for every step that loads a tokenizer, the path of
    the tiny tokenizer under ``tokenizer_root`` (default: ``folder`` itself).

    lerobot does not save every such field (pi0_fast's ``action_tokenizer_processor`` never saves
    ``paligemma_tokenizer_name``), so a pipeline loaded the way lerobot-eval loads it would fall
    back to the hub tokenizer. The fields are the steps' own constructor arguments, so lerobot's
    ``make_pre_post_processors(pretrained_path=folder)`` reads them as it reads any saved field.
    """
    pipeline_file = folder / PREPROCESSOR_FILE
    if spec is None or not pipeline_file.is_file():
        return
    root = Path(tokenizer_root or folder).absolute()
    relative = spec.get("tokenizers", {})
    pipeline = json.loads(pipeline_file.read_text())
    for field, steps in _tokenizer_fields(spec["policy_type"]).items():
        if field not in relative or not (root / relative[field]).exists():
            continue
        for step in pipeline["steps"]:
            for name, step_field in steps:
                if step.get("registry_name") == name:
                    step.setdefault("config", {})[step_field] = str(root / relative[field])
    pipeline_file.write_text(json.dumps(pipeline, indent=2))


TINY_FOLDERS = TinyPolicyFolders()
