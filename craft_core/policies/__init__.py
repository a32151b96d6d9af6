"""The policy types craft supports: one folder each, one registry (this module).

Each ``craft_core/policies/<type>/`` holds

- ``adapter.py``: the :class:`~craft_core.policies.base.PolicyAdapter` of that lerobot policy
  type (prefix inputs, hidden states, retention targets), used by every stage;
- ``tiny.py``: a builder of a tiny offline instance of the real lerobot class (tests and the
  offline demo only; loaded by ``craft_core.demo.tiny`` through the folder convention, never by
  production code).

Adding a policy type = a new folder with those two modules and one entry in ``ADAPTERS`` below.
"""

from craft_core.policies.base import ArraySpec, PolicyAdapter, PrefixHiddenStates, resolve_layers
from craft_core.policies.pi0.adapter import PI0Adapter
from craft_core.policies.pi0_fast.adapter import Pi0FastAdapter
from craft_core.policies.pi05.adapter import PI05Adapter
from craft_core.policies.smolvla.adapter import SmolVLAAdapter

ADAPTERS: dict[str, type[PolicyAdapter]] = {
    cls.policy_type: cls for cls in (Pi0FastAdapter, SmolVLAAdapter, PI0Adapter, PI05Adapter)
}
POLICY_TYPES: tuple[str, ...] = tuple(ADAPTERS)


def supported_policy_types() -> list[str]:
    return sorted(ADAPTERS)


def adapter_class(policy_type: str | None) -> type[PolicyAdapter]:
    if policy_type not in ADAPTERS:
        raise ValueError(f"craft has no adapter for policy type {policy_type!r}; supported: {sorted(ADAPTERS)}")
    return ADAPTERS[policy_type]


def get_adapter(policy) -> PolicyAdapter:
    """The adapter for a lerobot policy instance, chosen by ``policy.config.type``."""
    policy_type = getattr(getattr(policy, "config", None), "type", None)
    return adapter_class(policy_type)(policy)


__all__ = [
    "ADAPTERS",
    "POLICY_TYPES",
    "ArraySpec",
    "PolicyAdapter",
    "PrefixHiddenStates",
    "adapter_class",
    "get_adapter",
    "resolve_layers",
    "supported_policy_types",
]
