"""Tiny offline instances of the real lerobot VLA classes (tests and the offline demo).

``build_tiny_policy(policy_type, out_dir, ds_meta=..., seed=...)`` writes a folder that loads
like a hub checkpoint (the per-type builders live in ``craft_core/policies/<type>/tiny.py``);
``tiny_lerobot_models(spec)`` is the one context manager that shrinks lerobot's hard-coded
backbone sizes, active only while such a folder is built or loaded; ``loading.TINY_FOLDERS`` is
the plugin through which ``craft_core.policy_io`` loads these folders without importing this
package.
"""

from craft_core.demo.tiny.build import build_tiny_policy, supported_tiny_policy_types
from craft_core.demo.tiny.common import TINY_MARKER, copy_tiny_marker, read_tiny_spec
from craft_core.demo.tiny.loading import tiny_spec_of
from craft_core.demo.tiny.patching import tiny_lerobot_models

__all__ = [
    "TINY_MARKER",
    "build_tiny_policy",
    "copy_tiny_marker",
    "read_tiny_spec",
    "supported_tiny_policy_types",
    "tiny_lerobot_models",
    "tiny_spec_of",
]
