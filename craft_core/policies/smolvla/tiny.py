"""Tiny offline smolvla: the real ``SmolVLAPolicy`` on a local few-hundred-thousand-parameter SmolVLM.

No patch is needed: ``SmolVLAConfig.vlm_model_name`` may be a local folder, and with
``load_vlm_weights=False`` lerobot builds the VLM from its ``config.json`` and loads its
processor with ``AutoProcessor.from_pretrained``. The folder ``<policy>/tokenizers/vlm`` holds a
tiny ``SmolVLMConfig`` (llama text config with an explicit ``head_dim``, tiny SigLIP-style vision
tower), a small BPE tokenizer with SmolVLM's extra special tokens (``fake_image_token``,
``image_token``, ``global_image_token``, ``end_of_utterance_token``) and a ``SmolVLMProcessor``.

Unlike smolvla_base (``train_expert_only=True``, VLM frozen), the tiny instance trains the VLM
(``train_expert_only=False``, ``freeze_vision_encoder=False``): with a frozen VLM the prefix hidden
states can never drift and retention would be vacuous.
"""

from pathlib import Path
from typing import Any, Sequence

from craft_core.demo.tiny.common import TOKENIZERS_DIR, instantiate_and_save, split_overrides, tiny_spec, tokenizer_texts
from craft_core.demo.tiny.tokenizers import write_text_tokenizer

POLICY_TYPE = "smolvla"

# Config fields naming local tokenizer/backbone folders, and the processor steps that repeat them.
TOKENIZER_FIELDS: dict[str, list[tuple[str, str]]] = {"vlm_model_name": [("tokenizer_processor", "tokenizer_name")]}

SMOLVLM_SPECIAL_TOKENS = {
    "fake_image_token": "<fake_token_around_image>",
    "image_token": "<image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
}

# depth >= 2 so that layers [-2, -1] are distinct; with self_attn_every_n_layers=2 layer 0 is a
# self-attention layer and layer 1 a cross-attention layer, so both code paths run.
DEFAULT_SIZES: dict[str, int] = {
    "vocab_size": 512,
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
    "vision_patch_size": 8,
    "image_size": 64,  # also resize_imgs_with_padding
    "scale_factor": 2,  # pixel-shuffle: (64/8)^2 / 2^2 = 16 image tokens per camera
}

DEFAULT_CONFIG: dict[str, Any] = {
    "chunk_size": 4,
    "n_action_steps": 4,
    "num_steps": 2,
    "tokenizer_max_length": 48,
    "load_vlm_weights": False,
    "train_expert_only": False,
    "freeze_vision_encoder": False,
    "device": "cpu",
    "push_to_hub": False,
}

WHY_PATCHED = "not patched: vlm_model_name points at a local tiny SmolVLM folder (load_vlm_weights=False)"


def write_tiny_smolvlm(folder: Path, sizes: dict[str, int], texts: list[str]) -> Path:
    """A local SmolVLM folder: config.json, tokenizer and processor (no weights: lerobot inits them)."""
    from transformers import SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor
    from transformers.models.auto import AutoTokenizer

    write_text_tokenizer(folder, texts, vocab_size=sizes["vocab_size"], extra_special_tokens=SMOLVLM_SPECIAL_TOKENS)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = SmolVLMConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": sizes["vocab_size"],
            "hidden_size": sizes["hidden_size"],
            "intermediate_size": sizes["intermediate_size"],
            "num_hidden_layers": sizes["num_hidden_layers"],
            "num_attention_heads": sizes["num_attention_heads"],
            "num_key_value_heads": sizes["num_key_value_heads"],
            "head_dim": sizes["head_dim"],
            "max_position_embeddings": 512,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "hidden_size": sizes["vision_hidden_size"],
            "intermediate_size": sizes["vision_intermediate_size"],
            "num_hidden_layers": sizes["vision_num_hidden_layers"],
            "num_attention_heads": sizes["vision_num_attention_heads"],
            "patch_size": sizes["vision_patch_size"],
            "image_size": sizes["image_size"],
        },
        scale_factor=sizes["scale_factor"],
        image_token_id=tokenizer.convert_tokens_to_ids(SMOLVLM_SPECIAL_TOKENS["image_token"]),
        pad_token_id=tokenizer.pad_token_id,
    )
    config.save_pretrained(folder)
    image_processor = SmolVLMImageProcessor(
        size={"longest_edge": sizes["image_size"]},
        max_image_size={"longest_edge": sizes["image_size"]},
        do_image_splitting=False,
    )
    image_seq_len = (sizes["image_size"] // sizes["vision_patch_size"]) ** 2 // sizes["scale_factor"] ** 2
    processor = SmolVLMProcessor(
        image_processor=image_processor,
        video_processor=SmolVLMVideoProcessor(),
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
    )
    processor.save_pretrained(folder)
    return folder


def build(out_dir: Path, *, ds_meta, seed: int = 0, extra_texts: Sequence[str] = (), **overrides: Any) -> Path:
    """Write a tiny smolvla folder for ``ds_meta``'s features.

    ``overrides``: any key of ``DEFAULT_SIZES`` (backbone sizes) or a ``SmolVLAConfig`` field.
    """
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

    sizes, config_fields = split_overrides(
        overrides,
        default_sizes=DEFAULT_SIZES,
        default_config=DEFAULT_CONFIG,
        config_class=SmolVLAConfig,
        policy_type=POLICY_TYPE,
    )
    vlm_dir = write_tiny_smolvlm(out_dir / TOKENIZERS_DIR / "vlm", sizes, tokenizer_texts(ds_meta, extra_texts))
    cfg = SmolVLAConfig(
        vlm_model_name=str(vlm_dir),
        num_vlm_layers=sizes["num_hidden_layers"],
        resize_imgs_with_padding=(sizes["image_size"], sizes["image_size"]),
        **config_fields,
    )
    spec = tiny_spec(
        POLICY_TYPE,
        sizes=sizes,
        seed=seed,
        why_patched=WHY_PATCHED,
        tokenizers={"vlm_model_name": f"{TOKENIZERS_DIR}/vlm"},
    )
    return instantiate_and_save(cfg, spec, out_dir, ds_meta=ds_meta, seed=seed)
