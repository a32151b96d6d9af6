"""Per-policy adapters: prefix inputs and hidden states of lerobot VLAs."""

from craft_core.adapters.base import (
    ArraySpec,
    PolicyAdapter,
    PrefixHiddenStates,
    adapter_class,
    get_adapter,
    register_adapter,
    supported_policy_types,
)

__all__ = [
    "ArraySpec",
    "PolicyAdapter",
    "PrefixHiddenStates",
    "adapter_class",
    "get_adapter",
    "register_adapter",
    "supported_policy_types",
]
