"""``build_tiny_policy``: a tiny offline instance of a real lerobot policy, saved like a checkpoint.

The builder of each policy type lives next to its adapter, in ``craft_core/policies/<type>/tiny.py``
(``build(out_dir, *, ds_meta, seed, **overrides) -> Path`` and optionally ``patches(spec)``);
this module finds it by that folder convention for every type of the policy registry.
"""

import importlib
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from craft_core.policies import POLICY_TYPES


def tiny_module(policy_type: str) -> ModuleType:
    """``craft_core.policies.<policy_type>.tiny``; raises for a type without a tiny builder."""
    if policy_type not in POLICY_TYPES:
        raise ValueError(
            f"no tiny offline builder for policy type {policy_type!r}; supported: {supported_tiny_policy_types()}"
        )
    module = importlib.import_module(f"craft_core.policies.{policy_type}.tiny")
    if not hasattr(module, "build"):
        raise ValueError(f"craft_core.policies.{policy_type}.tiny has no build() function")
    return module


def supported_tiny_policy_types() -> list[str]:
    return list(POLICY_TYPES)


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
    size/config knobs (see ``craft_core.policies.<policy_type>.tiny.build``). ``out_dir`` must not
    exist or be empty. Returns ``out_dir``.
    """
    module = tiny_module(policy_type)
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
