"""What the per-policy tiny builders (``craft_core/policies/<type>/tiny.py``) share.

A tiny folder is what ``lerobot/pi0fast-base`` & co. are on the hub: ``config.json`` +
``model.safetensors`` (``policy.save_pretrained``) and the pre/post-processor pipelines, so
lerobot's own ``from_pretrained`` and ``make_pre_post_processors`` load it. It also holds its
local tokenizer folders (``tokenizers/``) and ``craft_tiny.json``, the marker that makes the tiny
folder plugin (``craft_core.demo.tiny.loading``) enter ``tiny_lerobot_models`` while loading it.
"""

import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

TINY_MARKER = "craft_tiny.json"
TOKENIZERS_DIR = "tokenizers"


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

    from craft_core.demo.tiny.patching import tiny_lerobot_models

    from craft_core.noise import quiet_prints

    torch.manual_seed(seed)
    with tiny_lerobot_models(spec), quiet_prints():  # lerobot's init chatter: noise.py
        policy = make_policy(cfg, ds_meta=ds_meta)
    policy.save_pretrained(out_dir)
    preprocessor, postprocessor = make_pre_post_processors(cfg, dataset_stats=ds_meta.stats)
    preprocessor.save_pretrained(out_dir)
    postprocessor.save_pretrained(out_dir)
    from craft_core.demo.tiny.loading import record_tokenizer_paths

    record_tokenizer_paths(out_dir, spec)
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


@contextmanager
def replaced_attribute(owner: Any, name: str, value: Any) -> Iterator[Any]:
    """Temporarily rebind ``owner.name`` (a module-level name of lerobot); yields the original."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield original
    finally:
        setattr(owner, name, original)
