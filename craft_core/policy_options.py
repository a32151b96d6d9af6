"""lerobot's own training options, checked against lerobot's own config classes.

- ``train.policy: {field: value}`` sets fields of the policy type's lerobot config
  (``PI0FastConfig``, ``SmolVLAConfig``...): :func:`validate_policy_options` refuses an unknown
  field or a value of the wrong type with the field named; :func:`apply_policy_options` sets them on
  a loaded config. Fields craft owns (the type, paths, device, features, PEFT) are refused with
  the setting to use instead.
- :func:`check_anchoring` refuses retention targets that cannot constrain anything under the
  policy's freezing (prefix anchoring with the VLM frozen: smolvla's default
  ``train_expert_only=True`` leaves the anchored states unchanged by construction).
- :func:`image_transforms_config` validates ``train.image_transforms`` as lerobot's
  ``ImageTransformsConfig``.
"""

import dataclasses
import functools
import typing
from typing import Any

# Fields of a policy config craft sets itself: where to set them instead.
OWNED_FIELDS: dict[str, str] = {
    "type": "the policy type is the teacher's (cache.teacher)",
    "pretrained_path": "set cache.teacher.path",
    "pretrained_revision": "set cache.teacher.revision",
    "device": "set train.device (and cache.device)",
    "input_features": "input features come from the dataset",
    "output_features": "output features come from the dataset",
    "use_peft": "set train.peft",
    "push_to_hub": "craft does not push checkpoints",
    "repo_id": "craft does not push checkpoints",
}

# Options that freeze part of the policy (lerobot's own freezing then applies, as in lerobot-train).
FREEZE_FIELDS = ("train_expert_only", "freeze_vision_encoder")


class PolicyOptionError(ValueError):
    """A ``train.policy`` option the policy type's lerobot config does not accept."""


class AnchoringError(ValueError):
    """Retention targets that the configured freezing makes meaningless."""


@functools.cache
def policy_config_class(policy_type: str):
    """The lerobot config class registered for ``policy_type``."""
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import get_policy_class  # noqa: F401  (registers every config class)

    known = PreTrainedConfig.get_known_choices()
    if policy_type not in known:
        raise PolicyOptionError(f"policy type {policy_type!r} is not a lerobot policy type; known: {sorted(known)}")
    return PreTrainedConfig.get_choice_class(policy_type)


@functools.cache
def _field_types(policy_type: str) -> dict[str, Any]:
    cls = policy_config_class(policy_type)
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def validate_policy_options(policy_type: str, options: dict[str, Any] | None, *, field: str = "train.policy") -> dict:
    """``options`` checked (and coerced, e.g. a YAML list to a tuple) against ``policy_type``'s config class."""
    from pydantic import TypeAdapter, ValidationError

    if not options:
        return {}
    types = _field_types(policy_type)
    checked = {}
    for name, value in options.items():
        if name in OWNED_FIELDS:
            raise PolicyOptionError(f"{field}.{name}: not settable here ({OWNED_FIELDS[name]})")
        if name not in types:
            close = [k for k in types if name.lower() in k.lower() or k.lower() in name.lower()]
            hint = f"; did you mean {close[:3]}?" if close else ""
            raise PolicyOptionError(
                f"{field}.{name}: {policy_config_class(policy_type).__name__} ({policy_type}) has no field "
                f"{name!r}{hint}")
        try:
            # A bool field takes true/false only (not 0, 1 or "yes"); other types coerce as pydantic's lax mode.
            checked[name] = TypeAdapter(types[name]).validate_python(value, strict=types[name] is bool)
        except ValidationError as exc:
            expected = getattr(types[name], "__name__", str(types[name]))
            raise PolicyOptionError(
                f"{field}.{name}: {value!r} is not a valid {expected} ({exc.errors()[0]['msg']})") from None
    return checked


def apply_policy_options(config, options: dict[str, Any] | None, *, field: str = "train.policy") -> None:
    """Set validated ``options`` on a loaded lerobot policy config, in place."""
    for name, value in validate_policy_options(config.type, options, field=field).items():
        setattr(config, name, value)


def freezes_anything(config) -> bool:
    return any(bool(getattr(config, name, False)) for name in FREEZE_FIELDS)


def check_anchoring(config, targets, *, field: str = "train.policy") -> None:
    """Refuse retention targets that cannot move under ``config``'s freezing (see the module doc)."""
    if "prefix" in targets and getattr(config, "train_expert_only", False):
        raise AnchoringError(
            f"prefix anchoring with {field}.train_expert_only=true ({config.type}{' default' if field == 'teacher' else ''}): "
            "the whole VLM is frozen, so the anchored prefix hidden states cannot change and their retention "
            "loss and gradient are zero by construction. Set train.policy.train_expert_only: false to fine-tune "
            "the VLM, or anchor the action path only (cache.targets: [action_output])"
        )


# Where each policy type's prefix (what ``prefix`` anchoring reads) lives: the VLM backbone.
PREFIX_MODULES = {
    "pi0_fast": "paligemma_with_expert.paligemma.",
    "pi0": "paligemma_with_expert.paligemma.",
    "pi05": "paligemma_with_expert.paligemma.",
    "smolvla": "vlm_with_expert.vlm.",
}


def check_trainable_prefix(policy, targets) -> None:
    """Refuse prefix anchoring when no trainable parameter sits in the prefix path (e.g. LoRA adapters on
    the action expert only: smolvla's and pi0's lerobot default targets)."""
    marker = PREFIX_MODULES.get(policy.config.type)
    if "prefix" not in targets or marker is None:
        return
    if not any(p.requires_grad and marker in name for name, p in policy.named_parameters()):
        raise AnchoringError(
            f"prefix anchoring, but no trainable parameter of this {policy.config.type} student is in its VLM "
            f"({marker.rstrip('.')}): the anchored prefix states cannot change, so their retention loss and "
            "gradient are zero by construction. With train.peft, add VLM modules to train.peft.target_modules "
            "(lerobot's defaults adapt the action expert only), or anchor the action path only "
            "(cache.targets: [action_output])"
        )


def image_transforms_config(options: dict[str, Any] | None):
    """``train.image_transforms`` as lerobot's ``ImageTransformsConfig`` (None when absent)."""
    from lerobot.transforms.transforms import ImageTransformsConfig, make_transform_from_config
    from pydantic import TypeAdapter, ValidationError

    if options is None:
        return None
    _check_keys(options, ImageTransformsConfig, "train.image_transforms")
    for name, tf in (options.get("tfs") or {}).items():
        if isinstance(tf, dict):
            _check_keys(tf, type(ImageTransformsConfig().tfs["brightness"]), f"train.image_transforms.tfs.{name}")
    try:
        cfg = TypeAdapter(ImageTransformsConfig).validate_python(options)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise ValueError(f"train.image_transforms.{where}: {error['msg']}") from None
    for name, tf in cfg.tfs.items():
        try:
            make_transform_from_config(tf)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"train.image_transforms.tfs.{name}: {exc}") from None
    return cfg


def _check_keys(options: dict, cls, field: str) -> None:
    if not isinstance(options, dict):
        raise ValueError(f"{field}: expected a mapping, got {options!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{field}.{unknown[0]}: not a field of lerobot's {cls.__name__} (fields: {sorted(known)})")
