"""Tiny offline pi0: the real ``PI0Policy`` with a few-hundred-thousand-parameter PaliGemma + expert.

pi05 is built the same way (``craft_core.policies.pi05.tiny`` reuses everything here with its own
lerobot module); what is said below holds for both.

Patch points (entered by ``craft_core.demo.tiny.patching.tiny_lerobot_models``), all module-level
names of ``lerobot.policies.pi0.modeling_pi0`` (``modeling_pi05`` for pi05) looked up at call time:

- ``get_gemma_config(variant)``: returns openpi's hard-coded 2B / 300M Gemma sizes. Replaced by
  the tiny sizes, ``gemma_2b`` -> the VLM (``vlm_*``), ``gemma_300m`` -> the action expert
  (``expert_*``). Both share depth, heads and head_dim: their attention runs jointly over the
  concatenated prefix + suffix tokens. ``num_heads`` must stay 8, because
  ``compute_layer_complete`` reshapes the attention output with a literal ``8 * head_dim``.
- ``PaliGemmaForConditionalGenerationWithPiGemma``: ``PaliGemmaWithExpertModel`` hard-codes a
  257152-token vocabulary and a so400m SigLIP with ``projection_dim`` 2048 in the config it passes
  to this class; a factory shrinks vocabulary, image-token index, SigLIP and projector, then calls
  the real class.
- ``PiGemmaForCausalLM`` (the action expert): same hard-coded vocabulary; a factory shrinks it.

Tokenizer: lerobot's processors hard-code ``TokenizerProcessorStep(tokenizer_name=
"google/paligemma-3b-pt-224")`` and load it with ``AutoTokenizer.from_pretrained``, which looks
in the Hugging Face hub cache. Inside the patches (and only there), the hub cache is redirected to
a craft-owned folder (``tiny_hub_cache_dir()``: ``$CRAFT_TINY_HF_HUB_CACHE`` or
``~/.cache/craft/tiny_hf_hub``) that holds a snapshot of that repo name with a small local
tokenizer (written on first use, never into the user's real hub cache), and hub access is
switched off, so the real (gated, 257k-token) tokenizer is never fetched for a tiny model. The
processors therefore have to be created inside ``tiny_lerobot_models`` as well.

Everything else is lerobot's own: policy, prefix construction, loss, sampling, ``save_pretrained``
/ ``from_pretrained`` and the processor pipelines.
"""

import copy
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Mapping, Sequence

from craft_core.demo.tiny.common import instantiate_and_save, replaced_attribute, split_overrides, tiny_spec
from craft_core.demo.tiny.patching import tiny_lerobot_models
from craft_core.demo.tiny.tokenizers import write_text_tokenizer

POLICY_TYPE = "pi0"

# lerobot's processors load this name with AutoTokenizer (processor_pi0.py / processor_pi05.py).
PALIGEMMA_TOKENIZER_REPO = "google/paligemma-3b-pt-224"

# Backbone sizes. depth >= 2 so that hidden-state layers [-2, -1] are distinct blocks.
DEFAULT_SIZES: dict[str, int] = {
    "vocab_size": 512,  # embedding rows; the local tokenizer has exactly TOKENIZER_VOCAB_SIZE tokens
    "depth": 2,  # shared by VLM and expert
    "num_heads": 8,  # shared; must be 8 (see module docstring)
    "num_kv_heads": 1,  # shared
    "head_dim": 16,  # shared
    "vlm_width": 64,
    "vlm_mlp_dim": 128,
    "expert_width": 32,
    "expert_mlp_dim": 64,
    "vision_hidden_size": 32,
    "vision_intermediate_size": 64,
    "vision_num_hidden_layers": 1,
    "vision_num_attention_heads": 2,
    "vision_patch_size": 16,
    "image_size": 64,  # the policy's image_resolution (square); 16 image tokens per camera
}

# PI0Config / PI05Config fields a tiny instance sets (short horizon keeps it fast on CPU).
DEFAULT_CONFIG: dict[str, Any] = {
    "chunk_size": 4,
    "n_action_steps": 4,
    "num_inference_steps": 3,
    "tokenizer_max_length": 32,
    "dtype": "float32",
    "device": "cpu",
    "push_to_hub": False,
}

TOKENIZER_VOCAB_SIZE = 512

# The snapshot's content is fixed by this recipe; bump the version when the recipe changes so
# a stale snapshot in the cache is never used.
_TOKENIZER_RECIPE_VERSION = "craft-tiny-paligemma-tokenizer-v1"
# Covers every printable ASCII character (no <unk> for any English task string) plus the words of
# lerobot's prompts (pi05: "Task: ..., State: 12 200;\nAction: ").
_TOKENIZER_CORPUS = (
    "".join(chr(c) for c in range(32, 127)),
    "pick place push move the a an to of on in from into onto and with block cube object",
    "red green blue yellow left right top bottom corner target box table lift put insert grasp",
    "Task: push the block, State: 0 1 2 12 128 200 255;\nAction: ",
)


def why_patched(policy_type: str) -> str:
    return (
        f"lerobot.policies.{policy_type}.modeling_{policy_type} hard-codes Gemma 2B/300M and a so400m "
        "PaliGemma with a 257152-token vocabulary; get_gemma_config, "
        "PaliGemmaForConditionalGenerationWithPiGemma and PiGemmaForCausalLM are replaced, inside "
        "tiny_lerobot_models(), by tiny-size versions, and the processors' hub tokenizer name "
        f"{PALIGEMMA_TOKENIZER_REPO!r} resolves to a local snapshot in craft's tiny hub cache."
    )


# --- the local PaliGemma tokenizer snapshot ----------------------------------------------------


def tiny_hub_cache_dir() -> Path:
    """The craft-owned Hugging Face hub cache used while tiny pi0/pi05 models are built or loaded."""
    configured = os.environ.get("CRAFT_TINY_HF_HUB_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "craft" / "tiny_hf_hub"


def ensure_paligemma_tokenizer_snapshot(cache_dir: Path) -> Path:
    """Write (once) a hub-cache snapshot of ``google/paligemma-3b-pt-224`` holding a tiny tokenizer.

    Layout is huggingface_hub's: ``models--google--paligemma-3b-pt-224/refs/main`` names the
    snapshot folder, which holds the tokenizer files and a ``config.json`` of
    ``{"model_type": "paligemma"}`` (AutoTokenizer reads it to pick the tokenizer family).
    Written into a temporary folder and renamed, so concurrent processes never see half a snapshot.
    """
    repo_dir = Path(cache_dir) / ("models--" + PALIGEMMA_TOKENIZER_REPO.replace("/", "--"))
    revision = hashlib.sha1(_TOKENIZER_RECIPE_VERSION.encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / revision
    if not (snapshot / "tokenizer.json").is_file():
        (repo_dir / "snapshots").mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=repo_dir / "snapshots"))
        staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            write_text_tokenizer(staging, _TOKENIZER_CORPUS, vocab_size=TOKENIZER_VOCAB_SIZE)
            (staging / "config.json").write_text(json.dumps({"model_type": "paligemma"}) + "\n")
            try:
                staging.rename(snapshot)
            except OSError:
                if not (snapshot / "tokenizer.json").is_file():  # lost a race only if the winner finished
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    refs = repo_dir / "refs" / "main"
    if not refs.is_file() or refs.read_text().strip() != revision:
        refs.parent.mkdir(parents=True, exist_ok=True)
        staging_ref = refs.with_name(f".main-{os.getpid()}")
        staging_ref.write_text(revision)
        os.replace(staging_ref, refs)
    return snapshot


@contextmanager
def local_paligemma_tokenizer() -> Iterator[Path]:
    """Resolve ``google/paligemma-3b-pt-224`` to craft's local snapshot, with hub access off."""
    from huggingface_hub import constants

    cache_dir = tiny_hub_cache_dir()
    snapshot = ensure_paligemma_tokenizer_snapshot(cache_dir)
    # transformers and huggingface_hub read these module attributes at call time.
    with replaced_attribute(constants, "HF_HUB_CACHE", str(cache_dir)), replaced_attribute(
        constants, "HF_HUB_OFFLINE", True
    ):
        yield snapshot


# --- patches shared by pi0 and pi05 --------------------------------------------------------------


def _sizes_for(spec: Mapping[str, Any], policy_type: str) -> Mapping[str, int]:
    if spec.get("policy_type") != policy_type:
        raise RuntimeError(
            f"a {policy_type} model is being built inside tiny_lerobot_models() for a "
            f"{spec.get('policy_type')!r} tiny folder; build/load each tiny policy in its own context"
        )
    return spec["sizes"]


@contextmanager
def patch_pi0_family(modeling: ModuleType, spec: Mapping[str, Any], policy_type: str) -> Iterator[None]:
    """Enter the tiny-size patches of one pi0-family modeling module (``modeling_pi0``/``modeling_pi05``).

    The tokenizer redirection is entered only for a spec of this policy type: the patched model
    factories act only when ``modeling``'s code runs, but the hub-cache redirection is global.
    """
    real_paligemma = modeling.PaliGemmaForConditionalGenerationWithPiGemma
    real_expert = modeling.PiGemmaForCausalLM
    gemma_config = modeling.GemmaConfig

    def tiny_gemma_config(variant: str):
        sizes = _sizes_for(spec, policy_type)
        role = {"gemma_2b": "vlm", "gemma_300m": "expert"}.get(variant)
        if role is None:
            raise ValueError(f"unknown Gemma variant {variant!r}; lerobot knows gemma_2b and gemma_300m")
        return gemma_config(
            width=sizes[f"{role}_width"],
            depth=sizes["depth"],
            mlp_dim=sizes[f"{role}_mlp_dim"],
            num_heads=sizes["num_heads"],
            num_kv_heads=sizes["num_kv_heads"],
            head_dim=sizes["head_dim"],
        )

    def tiny_paligemma(config):
        sizes = _sizes_for(spec, policy_type)
        config = copy.deepcopy(config)
        text, vision = config.text_config, config.vision_config
        text.vocab_size = sizes["vocab_size"]
        config._vocab_size = sizes["vocab_size"]  # noqa: SLF001 - the field lerobot sets
        config.image_token_index = sizes["vocab_size"]  # outside the vocabulary, as lerobot's 257152
        vision.hidden_size = sizes["vision_hidden_size"]
        vision.intermediate_size = sizes["vision_intermediate_size"]
        vision.num_hidden_layers = sizes["vision_num_hidden_layers"]
        vision.num_attention_heads = sizes["vision_num_attention_heads"]
        vision.patch_size = sizes["vision_patch_size"]
        # The projector maps SigLIP features into the VLM width.
        vision.projection_dim = text.hidden_size
        config.projection_dim = text.hidden_size
        text.num_image_tokens = (vision.image_size // vision.patch_size) ** 2
        return real_paligemma(config=config)

    def tiny_expert(config):
        sizes = _sizes_for(spec, policy_type)
        config = copy.deepcopy(config)
        config.vocab_size = sizes["vocab_size"]
        return real_expert(config=config)

    with ExitStack() as stack:
        stack.enter_context(replaced_attribute(modeling, "get_gemma_config", tiny_gemma_config))
        stack.enter_context(
            replaced_attribute(modeling, "PaliGemmaForConditionalGenerationWithPiGemma", tiny_paligemma)
        )
        stack.enter_context(replaced_attribute(modeling, "PiGemmaForCausalLM", tiny_expert))
        if spec.get("policy_type") == policy_type:
            stack.enter_context(local_paligemma_tokenizer())
        yield


@contextmanager
def patches(spec: Mapping[str, Any]) -> Iterator[None]:
    """Shrink pi0's PaliGemma and action expert to ``spec["sizes"]`` (see the module docstring)."""
    from lerobot.policies.pi0 import modeling_pi0

    with patch_pi0_family(modeling_pi0, spec, POLICY_TYPE):
        yield


# --- build ---------------------------------------------------------------------------------------


def _split_overrides(overrides: Mapping[str, Any], config_class: type, policy_type: str):
    sizes, config_fields = split_overrides(
        overrides,
        default_sizes=DEFAULT_SIZES,
        default_config=DEFAULT_CONFIG,
        config_class=config_class,
        policy_type=policy_type,
    )
    if sizes["num_heads"] != 8:
        raise ValueError(
            f"tiny {policy_type}: num_heads={sizes['num_heads']} but must be 8 (lerobot's "
            "compute_layer_complete reshapes attention outputs with a literal 8 heads)"
        )
    if sizes["depth"] < 2:
        raise ValueError(f"tiny {policy_type}: depth={sizes['depth']} must be >= 2 so layers [-2, -1] differ")
    if sizes["vocab_size"] < TOKENIZER_VOCAB_SIZE:
        raise ValueError(
            f"tiny {policy_type}: vocab_size={sizes['vocab_size']} is smaller than the local tokenizer's "
            f"{TOKENIZER_VOCAB_SIZE} tokens"
        )
    if sizes["image_size"] % sizes["vision_patch_size"]:
        raise ValueError(
            f"tiny {policy_type}: image_size={sizes['image_size']} is not a multiple of "
            f"vision_patch_size={sizes['vision_patch_size']}"
        )
    return sizes, config_fields


def build_pi0_family(
    out_dir: Path,
    *,
    ds_meta,
    seed: int,
    policy_type: str,
    config_class: type,
    overrides: Mapping[str, Any],
    config_defaults: Mapping[str, Any] | None = None,
) -> Path:
    """Write a tiny pi0-family folder (model, processors, ``craft_tiny.json``) for ``ds_meta``."""
    sizes, config_fields = _split_overrides(
        {**(config_defaults or {}), **overrides}, config_class, policy_type
    )
    cfg = config_class(image_resolution=(sizes["image_size"], sizes["image_size"]), **config_fields)
    spec = tiny_spec(
        policy_type,
        sizes=sizes,
        seed=seed,
        why_patched=why_patched(policy_type),
        tokenizers={"text": f"hub snapshot of {PALIGEMMA_TOKENIZER_REPO} in craft's tiny hub cache"},
    )
    # The processors load the PaliGemma tokenizer by hub name: they need the patches too.
    with tiny_lerobot_models(spec):
        return instantiate_and_save(cfg, spec, Path(out_dir), ds_meta=ds_meta, seed=seed)


def build(out_dir: Path, *, ds_meta, seed: int = 0, extra_texts: Sequence[str] = (), **overrides: Any) -> Path:
    """Write a tiny pi0 folder for ``ds_meta``'s features.

    ``overrides``: any key of ``DEFAULT_SIZES`` (backbone sizes) or a ``PI0Config`` field.
    ``extra_texts`` needs no handling: the PaliGemma tokenizer is the fixed snapshot, whose
    alphabet holds every printable ASCII character, so no instruction maps to ``<unk>``.
    """
    from lerobot.policies.pi0.configuration_pi0 import PI0Config

    return build_pi0_family(
        out_dir, ds_meta=ds_meta, seed=seed, policy_type=POLICY_TYPE, config_class=PI0Config, overrides=overrides
    )

