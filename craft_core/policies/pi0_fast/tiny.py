"""Tiny offline pi0_fast: the real ``PI0FastPolicy`` with a few-hundred-thousand-parameter PaliGemma.

Patch point (entered by ``craft_core.demo.tiny.patching.tiny_lerobot_models``): lerobot's
``PI0FastPaliGemma.__init__`` builds a ``PaliGemmaConfig`` with hard-coded 2B sizes (vocabulary
257152, SigLIP so400m at 224 px, ``projection_dim`` 2048) and passes it to the class found under
the name ``PaliGemmaForConditionalGenerationWithPiGemma`` in
``lerobot.policies.pi0_fast.modeling_pi0_fast``, looked up at call time. ``patches(spec)``
rebinds that name to a factory that overwrites the sizes with ``spec["sizes"]`` and calls the
real class. Nothing else of lerobot is touched: the policy, its prefix construction, its loss,
decoding, ``save_pretrained``/``from_pretrained`` and processors are lerobot's own.

The text tokenizer and the FAST action tokenizer are local folders written next to the model
(``tokenizers/text``, ``tokenizers/fast_action``; see ``craft_core.demo.tiny.tokenizers``).
"""

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from craft_core.demo.tiny.common import (
    TOKENIZERS_DIR,
    instantiate_and_save,
    replaced_attribute,
    split_overrides,
    tiny_spec,
    tokenizer_texts,
)
from craft_core.demo.tiny.tokenizers import write_fast_action_tokenizer, write_text_tokenizer

POLICY_TYPE = "pi0_fast"

# Config fields naming local tokenizer folders, and the processor steps that repeat them:
# {field: [(step registry name, step field), ...]}. lerobot does not save
# action_tokenizer_processor's paligemma_tokenizer_name at all, so loading must set it.
TOKENIZER_FIELDS: dict[str, list[tuple[str, str]]] = {
    "text_tokenizer_name": [
        ("tokenizer_processor", "tokenizer_name"),
        ("action_tokenizer_processor", "paligemma_tokenizer_name"),
    ],
    "action_tokenizer_name": [("action_tokenizer_processor", "action_tokenizer_name")],
}

# Backbone sizes. depth >= 2 so that hidden-state layers [-2, -1] are distinct blocks.
DEFAULT_SIZES: dict[str, int] = {
    "vocab_size": 1024,  # text tokenizer vocabulary == embedding rows
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "vision_hidden_size": 32,
    "vision_intermediate_size": 64,
    "vision_num_hidden_layers": 1,
    "vision_num_attention_heads": 2,
    "vision_patch_size": 16,
    "image_size": 64,  # also the policy's image_resolution
    "action_vocab_size": 256,
}

# PI0FastConfig fields a tiny instance sets (short horizon and prompts keep it fast on CPU).
DEFAULT_CONFIG: dict[str, Any] = {
    "chunk_size": 4,
    "n_action_steps": 4,
    "max_action_tokens": 16,
    "max_decoding_steps": 16,
    "tokenizer_max_length": 48,
    "validate_action_token_prefix": False,  # an untrained tiny model rarely starts with "Action:"
    "dtype": "float32",
    "device": "cpu",
    "push_to_hub": False,
}

WHY_PATCHED = (
    "lerobot.policies.pi0_fast.modeling_pi0_fast.PI0FastPaliGemma hard-codes PaliGemma 2B sizes; "
    "PaliGemmaForConditionalGenerationWithPiGemma is replaced, inside tiny_lerobot_models(), by a "
    "factory that shrinks the PaliGemmaConfig to `sizes`."
)


def _shrink_paligemma_config(config, sizes: Mapping[str, int]) -> None:
    text, vision = config.text_config, config.vision_config
    text.hidden_size = sizes["hidden_size"]
    text.intermediate_size = sizes["intermediate_size"]
    text.num_hidden_layers = sizes["num_hidden_layers"]
    text.num_attention_heads = sizes["num_attention_heads"]
    text.num_key_value_heads = sizes["num_key_value_heads"]
    text.head_dim = sizes["head_dim"]
    text.vocab_size = sizes["vocab_size"]
    vision.hidden_size = sizes["vision_hidden_size"]
    vision.intermediate_size = sizes["vision_intermediate_size"]
    vision.num_hidden_layers = sizes["vision_num_hidden_layers"]
    vision.num_attention_heads = sizes["vision_num_attention_heads"]
    vision.patch_size = sizes["vision_patch_size"]
    vision.image_size = sizes["image_size"]
    # The projector maps SigLIP features into the text width.
    vision.projection_dim = sizes["hidden_size"]
    config.projection_dim = sizes["hidden_size"]
    config.hidden_size = sizes["hidden_size"]
    config.vocab_size = sizes["vocab_size"]
    config.image_token_index = sizes["vocab_size"]  # outside the vocabulary, as in lerobot (257152)
    text.num_image_tokens = (sizes["image_size"] // sizes["vision_patch_size"]) ** 2


@contextmanager
def patches(spec: Mapping[str, Any]) -> Iterator[None]:
    """Shrink pi0_fast's PaliGemma to ``spec["sizes"]`` (see the module docstring)."""
    from lerobot.policies.pi0_fast import modeling_pi0_fast

    name = "PaliGemmaForConditionalGenerationWithPiGemma"
    real_class = getattr(modeling_pi0_fast, name)

    def tiny_paligemma(config):
        if spec["policy_type"] != POLICY_TYPE:
            raise RuntimeError(
                f"a pi0_fast model is being built inside tiny_lerobot_models() for a {spec['policy_type']!r} "
                "tiny folder; build/load each tiny policy in its own policy_loading_context"
            )
        _shrink_paligemma_config(config, spec["sizes"])
        return real_class(config=config)

    with replaced_attribute(modeling_pi0_fast, name, tiny_paligemma):
        yield


def build(out_dir: Path, *, ds_meta, seed: int = 0, extra_texts: Sequence[str] = (), **overrides: Any) -> Path:
    """Write a tiny pi0_fast folder for ``ds_meta``'s features.

    ``overrides``: any key of ``DEFAULT_SIZES`` (backbone sizes) or a ``PI0FastConfig`` field.
    """
    from lerobot.policies.pi0_fast.configuration_pi0_fast import PI0FastConfig

    sizes, config_fields = split_overrides(
        overrides,
        default_sizes=DEFAULT_SIZES,
        default_config=DEFAULT_CONFIG,
        config_class=PI0FastConfig,
        policy_type=POLICY_TYPE,
    )

    action_dim = int(ds_meta.features["action"]["shape"][0])
    text_dir = out_dir / TOKENIZERS_DIR / "text"
    action_dir = out_dir / TOKENIZERS_DIR / "fast_action"
    write_text_tokenizer(text_dir, tokenizer_texts(ds_meta, extra_texts), vocab_size=sizes["vocab_size"])
    write_fast_action_tokenizer(
        action_dir,
        time_horizon=config_fields["chunk_size"],
        action_dim=action_dim,
        vocab_size=sizes["action_vocab_size"],
        seed=seed,
    )
    fast_skip = config_fields.get("fast_skip_tokens", PI0FastConfig.fast_skip_tokens)
    if sizes["vocab_size"] <= sizes["action_vocab_size"] + fast_skip + len(("<pad>", "<eos>", "<bos>", "<unk>")):
        raise ValueError(
            f"vocab_size={sizes['vocab_size']} is too small to hold {sizes['action_vocab_size']} FAST action "
            f"tokens after skipping {fast_skip}; raise vocab_size"
        )

    cfg = PI0FastConfig(
        text_tokenizer_name=str(text_dir),
        action_tokenizer_name=str(action_dir),
        image_resolution=(sizes["image_size"], sizes["image_size"]),
        **config_fields,
    )
    spec = tiny_spec(
        POLICY_TYPE,
        sizes=sizes,
        seed=seed,
        why_patched=WHY_PATCHED,
        tokenizers={
            "text_tokenizer_name": f"{TOKENIZERS_DIR}/text",
            "action_tokenizer_name": f"{TOKENIZERS_DIR}/fast_action",
        },
    )
    return instantiate_and_save(cfg, spec, out_dir, ds_meta=ds_meta, seed=seed)
