"""Tiny offline pi05: the real ``PI05Policy``, built and patched exactly like tiny pi0.

The patch points, sizes and local tokenizer are those of ``craft_core.policies.pi0.tiny`` applied to
``lerobot.policies.pi05.modeling_pi05`` (same hard-coded ``get_gemma_config``,
``PaliGemmaForConditionalGenerationWithPiGemma`` and ``PiGemmaForCausalLM``). pi05 differs in
what lerobot does with them: the expert uses adaRMS conditioned on the time step, and the state
is discretised into the language prompt (``Task: ..., State: 12 200 ...;\\nAction: ``) by the
preprocessor, so prompts are longer and the default ``tokenizer_max_length`` is larger.
"""

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from craft_core.policies.pi0.tiny import build_pi0_family, patch_pi0_family

POLICY_TYPE = "pi05"

# Room for "Task: <task>, State: <one bin per state dimension>;\nAction: ".
DEFAULT_CONFIG: dict[str, Any] = {"tokenizer_max_length": 64}


@contextmanager
def patches(spec: Mapping[str, Any]) -> Iterator[None]:
    """Shrink pi05's PaliGemma and action expert to ``spec["sizes"]`` (see ``craft_core.policies.pi0.tiny``)."""
    from lerobot.policies.pi05 import modeling_pi05

    with patch_pi0_family(modeling_pi05, spec, POLICY_TYPE):
        yield


def build(out_dir: Path, *, ds_meta, seed: int = 0, extra_texts: Sequence[str] = (), **overrides: Any) -> Path:
    """Write a tiny pi05 folder for ``ds_meta``'s features.

    ``overrides``: any key of ``craft_core.policies.pi0.tiny.DEFAULT_SIZES`` or a ``PI05Config`` field;
    ``extra_texts`` as for pi0 (the fixed tokenizer snapshot covers every printable character).
    """
    from lerobot.policies.pi05.configuration_pi05 import PI05Config

    return build_pi0_family(
        out_dir,
        ds_meta=ds_meta,
        seed=seed,
        policy_type=POLICY_TYPE,
        config_class=PI05Config,
        overrides=overrides,
        config_defaults=DEFAULT_CONFIG,
    )
