"""The one place where craft changes lerobot's behaviour: shrinking hard-coded backbone sizes.

Some lerobot VLAs hard-code the size of their backbone (pi0_fast builds a 2B PaliGemma whatever
its config says), so a tiny offline instance of the *real* class needs the size to be changed at
construction time. ``tiny_lerobot_models(spec)`` is the only context manager that does this; it
is active only while a tiny policy is built (``craft_core.demo.tiny.build``) or loaded (the tiny
folder plugin ``craft_core.demo.tiny.loading`` on a folder marked with ``craft_tiny.json``).
Outside it lerobot is untouched, so hub checkpoints load exactly as lerobot loads them.

The context manager enters, in order, the ``patches(spec)`` context manager of every per-policy
tiny module ``craft_core.policies.<policy_type>.tiny``; a module without ``patches`` (smolvla
needs none) is skipped. Each ``patches`` documents its own patch points;
today they are:

- ``craft_core.policies.pi0_fast.tiny``: the name ``PaliGemmaForConditionalGenerationWithPiGemma`` in
  ``lerobot.policies.pi0_fast.modeling_pi0_fast`` (looked up when ``PI0FastPaliGemma`` is built)
  is replaced by a factory that shrinks the ``PaliGemmaConfig`` to ``spec["sizes"]`` and then
  calls the real class.
- ``craft_core.policies.pi0.tiny`` / ``craft_core.policies.pi05.tiny``: in ``lerobot.policies.pi0.modeling_pi0``
  (``modeling_pi05``) the names ``get_gemma_config``, ``PaliGemmaForConditionalGenerationWithPiGemma``
  and ``PiGemmaForCausalLM``, plus (for a spec of that type only) a hub-cache redirection so the
  processors' hard-coded ``google/paligemma-3b-pt-224`` tokenizer resolves to a small local one.
- ``craft_core.policies.smolvla.tiny``: none (a local ``vlm_model_name`` folder suffices).

``spec`` is the content of a tiny folder's ``craft_tiny.json`` (``policy_type``, ``sizes``, ...).
Every module's patch is entered whatever ``spec["policy_type"]`` is; a patch only acts when the
lerobot code it wraps runs, and reads the sizes it needs from the spec at that moment.
"""

import threading
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator, Mapping

# Patches rebind module-level names of lerobot: two threads building models at once with
# different specs would see each other's patches, so entering is serialised.
_PATCH_LOCK = threading.RLock()
_ACTIVE_SPECS: list[Mapping[str, Any]] = []


def _policy_patch_factories() -> list:
    # Imported here, not at module level: the per-policy tiny modules import this package's helpers.
    from craft_core.demo.tiny.build import supported_tiny_policy_types, tiny_module

    factories = []
    for policy_type in supported_tiny_policy_types():
        patches = getattr(tiny_module(policy_type), "patches", None)
        if patches is not None:
            factories.append(patches)
    return factories


@contextmanager
def tiny_lerobot_models(spec: Mapping[str, Any]) -> Iterator[None]:
    """Build/load lerobot policies at the tiny sizes of ``spec`` (a ``craft_tiny.json`` dict)."""
    if "policy_type" not in spec or "sizes" not in spec:
        raise ValueError(
            f"tiny spec needs 'policy_type' and 'sizes' (the content of craft_tiny.json), got keys {sorted(spec)}"
        )
    with _PATCH_LOCK, ExitStack() as stack:
        # Re-entering for the spec already active (load_policy inside policy_loading_context)
        # must not stack a second layer of patches on top of the first.
        if not (_ACTIVE_SPECS and _ACTIVE_SPECS[-1] == spec):
            for patches in _policy_patch_factories():
                stack.enter_context(patches(spec))
        _ACTIVE_SPECS.append(spec)
        stack.callback(_ACTIVE_SPECS.pop)
        yield
