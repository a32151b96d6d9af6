"""Local tokenizer folders for tiny offline policies (no hub).

- ``write_text_tokenizer``: a small byte-pair-encoding text tokenizer trained with ``tokenizers``
  on the dataset's task strings plus the words lerobot's prompts use (``Task:``, ``State:``,
  the 0..255 state bins, ``Action:``), saved with ``PreTrainedTokenizerFast.save_pretrained`` so
  ``AutoTokenizer.from_pretrained(folder)`` loads it. Its vocabulary is padded with reserved
  ``<unused_i>`` tokens up to a fixed size, as PaliGemma's is: pi0_fast maps FAST action tokens
  onto the *end* of the text vocabulary (``vocab_size - 1 - fast_skip_tokens - token``), so the
  text vocabulary must be larger than ``fast_skip_tokens`` + the action vocabulary.
- ``write_fast_action_tokenizer``: a FAST-compatible action tokenizer (DCT over time, scaled and
  rounded coefficients as characters, BPE over them), loaded by lerobot with
  ``AutoProcessor.from_pretrained(folder, trust_remote_code=True)``: ``processor_config.json``
  carries an ``auto_map`` to ``processing_craft_fast.py`` in the same folder. The interface is the
  one lerobot uses from ``physical-intelligence/fast``: ``__call__(actions[B,H,D])`` -> token id
  lists, ``.bpe_tokenizer``, ``.min_token``, ``.scale``.
"""

import json
from pathlib import Path
from typing import Iterable

import numpy as np

TEXT_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")  # ids 0..3, Gemma's order
ACTION_END_TOKEN = "|"

# Words lerobot's own prompts contain: pi0_fast "Task: ..., State: 12 200;\n" and "Action: ... |".
_PROMPT_WORDS = "Task: State: Action: | ; , . \n" + " ".join(str(i) for i in range(256))


def write_text_tokenizer(
    folder: Path,
    texts: Iterable[str],
    *,
    vocab_size: int = 1024,
    extra_special_tokens: dict[str, str] | None = None,
    model_max_length: int = 512,
) -> Path:
    """Train a small BPE on ``texts`` and save it as a ``PreTrainedTokenizerFast`` folder.

    ``extra_special_tokens`` (attribute name -> token, e.g. SmolVLM's ``image_token``) are added
    as special tokens. The vocabulary is padded with ``<unused_i>`` to exactly ``vocab_size``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    extra_special_tokens = dict(extra_special_tokens or {})
    specials = list(TEXT_SPECIAL_TOKENS) + [t for t in extra_special_tokens.values() if t not in TEXT_SPECIAL_TOKENS]
    corpus = [_PROMPT_WORDS, *texts]

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer=trainer)

    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise ValueError(f"text tokenizer came out with {len(vocab)} tokens, more than vocab_size={vocab_size}")
    merges = _bpe_merges(tokenizer)
    for i in range(vocab_size - len(vocab)):
        vocab[f"<unused_{i}>"] = len(vocab)
    padded = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    padded.pre_tokenizer = tokenizer.pre_tokenizer
    padded.decoder = tokenizer.decoder
    padded.add_special_tokens(specials)
    # pi0_fast ends every action sequence with "|" and cuts decoded tokens at the bare "|" token
    # (and stops decoding at its id): keep it one token, never merged with a word boundary.
    padded.add_tokens([AddedToken(ACTION_END_TOKEN, normalized=False)])

    fast = PreTrainedTokenizerFast(
        tokenizer_object=padded,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,  # PaliGemma's tokenizer starts every prompt with <bos>
        add_eos_token=False,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        extra_special_tokens=extra_special_tokens or None,
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return folder


def _bpe_merges(tokenizer) -> list[tuple[str, str]]:
    model = json.loads(tokenizer.to_str())["model"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]


# --- FAST-compatible action tokenizer ---------------------------------------------------------

# Coefficient c is written as chr(c - min_token); min_token is offset by 256 so every character
# is a printable non-space one (lerobot decodes with ord(ch) + min_token, so any offset works).
_CHAR_OFFSET = 256

_PROCESSOR_MODULE = "processing_craft_fast"
_PROCESSOR_CLASS = "CraftFastActionTokenizer"

_PROCESSOR_SOURCE = '''"""FAST-compatible action tokenizer written by craft (craft_core/demo/tiny/tokenizers.py).

Actions [H, D] -> DCT over time (orthonormal) -> coefficients * scale, rounded and clipped to
+-max_coefficient -> characters chr(c - min_token) -> byte-pair encoding. Same interface as
physical-intelligence/fast as used by lerobot: __call__, .bpe_tokenizer, .min_token, .scale.
"""

import json
import os

import numpy as np
from scipy.fft import dct, idct
from transformers import PreTrainedTokenizerFast


class CraftFastActionTokenizer:
    def __init__(self, bpe_tokenizer, scale, min_token, max_coefficient, time_horizon=None, action_dim=None):
        self.bpe_tokenizer = bpe_tokenizer
        self.scale = float(scale)
        self.min_token = int(min_token)
        self.max_coefficient = int(max_coefficient)
        self.time_horizon = time_horizon
        self.action_dim = action_dim

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoProcessor"):
        pass  # transformers calls this on remote-code classes; nothing to register locally

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        folder = str(pretrained_model_name_or_path)
        with open(os.path.join(folder, "processor_config.json")) as f:
            config = json.load(f)
        bpe = PreTrainedTokenizerFast.from_pretrained(os.path.join(folder, "bpe_tokenizer"))
        return cls(
            bpe,
            scale=config["scale"],
            min_token=config["min_token"],
            max_coefficient=config["max_coefficient"],
            time_horizon=config.get("time_horizon"),
            action_dim=config.get("action_dim"),
        )

    def _to_text(self, chunk):
        coefficients = np.round(dct(np.asarray(chunk, dtype=np.float64), axis=0, norm="ortho") * self.scale)
        coefficients = np.clip(coefficients, -self.max_coefficient, self.max_coefficient).astype(np.int64)
        return "".join(chr(int(c) - self.min_token) for c in coefficients.flatten())

    def __call__(self, action_chunk):
        chunks = np.asarray(action_chunk, dtype=np.float64)
        if chunks.ndim == 2:
            chunks = chunks[None]
        return [self.bpe_tokenizer.encode(self._to_text(chunk), add_special_tokens=False) for chunk in chunks]

    def decode(self, tokens, time_horizon=None, action_dim=None):
        time_horizon = time_horizon or self.time_horizon
        action_dim = action_dim or self.action_dim
        actions = []
        for ids in tokens:
            text = self.bpe_tokenizer.decode(ids)
            coefficients = np.array([ord(ch) + self.min_token for ch in text], dtype=np.float64)
            coefficients = coefficients.reshape(time_horizon, action_dim)
            actions.append(idct(coefficients / self.scale, axis=0, norm="ortho"))
        return np.stack(actions)
'''


def write_fast_action_tokenizer(
    folder: Path,
    *,
    time_horizon: int,
    action_dim: int,
    scale: float = 10.0,
    max_coefficient: int = 100,
    vocab_size: int = 256,
    seed: int = 0,
    n_training_chunks: int = 512,
) -> Path:
    """Write a FAST-compatible action tokenizer folder (BPE trained on synthetic smooth chunks).

    The BPE is fitted to random-walk action chunks in normalised units (what lerobot feeds it:
    actions after the MEAN_STD normaliser), ``time_horizon x action_dim`` each.
    """
    from tokenizers import Tokenizer, decoders, models, trainers
    from transformers import PreTrainedTokenizerFast

    min_token = -max_coefficient - _CHAR_OFFSET
    alphabet = [chr(c - min_token) for c in range(-max_coefficient, max_coefficient + 1)]
    if vocab_size < len(alphabet):
        raise ValueError(f"action vocab_size={vocab_size} is smaller than the coefficient alphabet ({len(alphabet)})")

    rng = np.random.default_rng(seed)
    chunks = np.cumsum(rng.normal(scale=0.3, size=(n_training_chunks, time_horizon, action_dim)), axis=1)
    chunks += rng.normal(size=(n_training_chunks, 1, action_dim))
    from scipy.fft import dct

    texts = []
    for chunk in chunks:
        coefficients = np.clip(np.round(dct(chunk, axis=0, norm="ortho") * scale), -max_coefficient, max_coefficient)
        texts.append("".join(chr(int(c) - min_token) for c in coefficients.flatten()))

    bpe = Tokenizer(models.BPE())
    bpe.decoder = decoders.Fuse()  # characters are coefficients: decode must not insert spaces
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=bpe, clean_up_tokenization_spaces=False).save_pretrained(
        folder / "bpe_tokenizer"
    )
    (folder / f"{_PROCESSOR_MODULE}.py").write_text(_PROCESSOR_SOURCE)
    config = {
        "auto_map": {"AutoProcessor": f"{_PROCESSOR_MODULE}.{_PROCESSOR_CLASS}"},
        "scale": scale,
        "min_token": min_token,
        "max_coefficient": max_coefficient,
        "time_horizon": time_horizon,
        "action_dim": action_dim,
        "vocab_size": bpe.get_vocab_size(),
    }
    (folder / "processor_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder
