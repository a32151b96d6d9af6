"""Tiny offline instances of the real lerobot VLA classes (tests and the offline demo).

``build_tiny_policy(policy_type, out_dir, ds_meta=..., seed=...)`` writes a folder that loads
like a hub checkpoint; ``tiny_lerobot_models(spec)`` is the one context manager that shrinks
lerobot's hard-coded backbone sizes, active only while such a folder is built or loaded.
"""

from craft_core.tiny.build import (
    TINY_MARKER,
    build_tiny_policy,
    copy_tiny_marker,
    read_tiny_spec,
    supported_tiny_policy_types,
)
from craft_core.tiny.patching import tiny_lerobot_models

__all__ = [
    "TINY_MARKER",
    "build_tiny_policy",
    "copy_tiny_marker",
    "read_tiny_spec",
    "supported_tiny_policy_types",
    "tiny_lerobot_models",
]
