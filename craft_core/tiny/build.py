"""``build_tiny_policy``: a tiny offline instance of a real lerobot policy, saved like a checkpoint.

The folder written is what ``lerobot/pi0fast-base`` & co. are on the hub: ``config.json`` +
``model.safetensors`` (``policy.save_pretrained``) and the pre/post-processor pipelines
(``policy_preprocessor.json`` ...), so ``from_pretrained(folder)`` and
``make_pre_post_processors(cfg, pretrained_path=folder)`` load it through lerobot's own code.
It also holds the local tokenizer folders (``tokenizers/``) and ``craft_tiny.json``, the marker
that makes ``craft_core.policy_io`` enter ``tiny_lerobot_models`` while loading it.

Tokenizer paths inside ``config.json`` and the processor JSONs are absolute (lerobot resolves
them relative to the working directory otherwise); ``craft_core.policy_io`` re-points them to
``<folder>/tokenizers/...`` when the folder has been moved.

Each policy type lives in ``craft_core.tiny.<policy_type>`` with
``build(out_dir, *, ds_meta, seed, **overrides) -> Path`` and optionally ``patches(spec)``.
"""

import importlib
import json
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from craft_core.tiny.patching import POLICY_MODULES, tiny_lerobot_models

TINY_MARKER = "craft_tiny.json"
TOKENIZERS_DIR = "tokenizers"


def supported_tiny_policy_types() -> list[str]:
    return [name for name in POLICY_MODULES if _policy_module(name, required=False) is not None]


def _policy_module(policy_type: str, *, required: bool = True):
    module_name = f"craft_core.tiny.{policy_type}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        module = None
    if module is not None and hasattr(module, "build"):
        return module
    if required:
        raise ValueError(
            f"no tiny offline builder for policy type {policy_type!r}; supported: {supported_tiny_policy_types()}"
        )
    return None


def build_tiny_policy(
    policy_type: str,
    out_dir: str | Path,
    *,
    ds_meta,
    seed: int = 0,
    extra_texts: Sequence[str] = (),
    **overrides: Any,
) -> Path:
    """Build a tiny ``policy_type`` policy for ``ds_meta``'s features and save it into ``out_dir``.

    The text tokenizer is trained on ``ds_meta``'s task strings plus ``extra_texts`` (e.g. the
    instructions of the other datasets the policy will see). ``overrides`` are per-type
    size/config knobs (see ``craft_core.tiny.<policy_type>.build``). ``out_dir`` must not exist
    or be empty. Returns ``out_dir``.
    """
    if policy_type not in POLICY_MODULES:
        raise ValueError(
            f"no tiny offline builder for policy type {policy_type!r}; supported: {supported_tiny_policy_types()}"
        )
    module = _policy_module(policy_type)
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"tiny policy folder {out_dir} is not empty; remove it or pick another out_dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        if extra_texts:
            overrides["extra_texts"] = list(extra_texts)
        return module.build(out_dir, ds_meta=ds_meta, seed=seed, **overrides)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)  # never leave a half-written folder that looks loadable
        raise


# --- helpers shared by the per-policy builders -------------------------------------------------


def split_overrides(
    overrides: Mapping[str, Any],
    *,
    default_sizes: Mapping[str, int],
    default_config: Mapping[str, Any],
    config_class: type,
    policy_type: str,
) -> tuple[dict[str, int], dict[str, Any]]:
    """``build(**overrides)`` keywords -> (backbone sizes, config fields), each on top of its defaults.

    A key of ``default_sizes`` is a size (made an int); a field of the lerobot ``config_class``
    dataclass is a config field; anything else is a typo and raises.
    """
    sizes = dict(default_sizes)
    config_fields = dict(default_config)
    for key, value in overrides.items():
        if key in sizes:
            sizes[key] = int(value)
        elif key in config_class.__dataclass_fields__:
            config_fields[key] = value
        else:
            raise ValueError(
                f"unknown tiny {policy_type} override {key!r}: use a size ({sorted(sizes)}) or a "
                f"{config_class.__name__} field"
            )
    return sizes, config_fields


def tiny_spec(policy_type: str, *, sizes: Mapping[str, int], seed: int, why_patched: str, tokenizers: dict) -> dict:
    """The ``craft_tiny.json`` content that tells ``tiny_lerobot_models`` how to rebuild the model."""
    return {
        "policy_type": policy_type,
        "sizes": dict(sizes),
        "seed": seed,
        "why_patched": why_patched,
        "tokenizers": tokenizers,
    }


def instantiate_and_save(cfg, spec: dict, out_dir: Path, *, ds_meta, seed: int) -> Path:
    """Make the real policy with lerobot's ``make_policy`` under the tiny patches and save it.

    Writes the model, both processor pipelines (built from ``ds_meta.stats`` by lerobot's
    ``make_pre_post_processors``) and ``craft_tiny.json`` (last, so it marks a complete folder).
    """
    from lerobot.policies.factory import make_policy, make_pre_post_processors

    torch.manual_seed(seed)
    with tiny_lerobot_models(spec):
        policy = make_policy(cfg, ds_meta=ds_meta)
    policy.save_pretrained(out_dir)
    preprocessor, postprocessor = make_pre_post_processors(cfg, dataset_stats=ds_meta.stats)
    preprocessor.save_pretrained(out_dir)
    postprocessor.save_pretrained(out_dir)
    spec = dict(spec)
    spec["n_parameters"] = sum(p.numel() for p in policy.parameters())
    write_tiny_spec(out_dir, spec)
    return out_dir


def tokenizer_texts(ds_meta, extra_texts: Sequence[str] = ()) -> list[str]:
    """Texts a tiny text tokenizer is trained on: the dataset's task strings plus ``extra_texts``."""
    tasks = getattr(ds_meta, "tasks", None)
    return ([] if tasks is None else [str(t) for t in tasks.index]) + [str(t) for t in extra_texts]


def write_tiny_spec(folder: Path, spec: dict) -> None:
    (Path(folder) / TINY_MARKER).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")


def read_tiny_spec(folder: str | Path) -> dict | None:
    """The ``craft_tiny.json`` of ``folder``, or None when it is not a tiny folder."""
    marker = Path(folder) / TINY_MARKER
    if not marker.is_file():
        return None
    return json.loads(marker.read_text())


def copy_tiny_marker(source_folder: str | Path, dest_folder: str | Path) -> bool:
    """Copy ``craft_tiny.json`` to a checkpoint saved from a tiny policy (so it reloads tiny)."""
    marker = Path(source_folder) / TINY_MARKER
    if not marker.is_file():
        return False
    shutil.copyfile(marker, Path(dest_folder) / TINY_MARKER)
    return True
