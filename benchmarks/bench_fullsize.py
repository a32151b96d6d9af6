"""The pipeline at real size on CPU: full-size lerobot VLAs with random weights, no hub, no GPU.

For each policy type asked for (default ``smolvla``; ``pi0_fast``, ``pi0``, ``pi05`` where memory
allows: see "Cost at real size"), a fresh process builds the real lerobot policy at its **real configuration** — the sizes
lerobot hard-codes or its config defaults give (pi0_fast: PaliGemma 2B + SigLIP so400m at 224 px,
vocabulary 257152, ``tokenizer_max_length`` 200, ``max_action_tokens`` 256; pi0/pi05: + the 300M
Gemma action expert, chunk 50; smolvla: SmolVLM2-500M's sizes, first 16 layers, 512 px) — with
random weights and local tokenizers (``craft_core.demo.tiny.tokenizers``: the same kind of local
folders the tiny policies use; only the tokenizers are small, never the model), on a small
two-camera dataset written here. Then:

1. **cache**: one anchor batch through ``craft_core.extraction.extract_anchors`` (the cache stage's
   own code: dataset, anchor selection, preprocessor, the adapter's stored inputs, the teacher's
   targets, the Zarr writes; only the teacher's loading is handed the model already built, to
   avoid writing and re-reading multi-GB weights);
2. **train**: one CRaFT retention step (``craft_core.train.update_policy`` with K = 1: task forward /
   backward, retention forward / backward, surgery, AdamW step) on LoRA adapters attached by
   ``craft_core.train.wrap_with_peft`` (lerobot's own ``wrap_with_peft``; its default targets),
   the anchor store opened by ``craft_core.retention.open_retention``.

Reported per policy: parameter count (total, trainable under LoRA); image tokens per camera and
prefix length as the adapter hands them to pooling, checked against the policy's own prefix
construction (its ``embed_image`` / ``embed_prefix*`` outputs, captured during the same forward);
bytes per anchor per store array (raw and as stored, compressed) and per target; seconds per anchor
(extraction) and per retention step; peak resident memory of the extraction and of the step
(kernel peak-RSS counter, reset between phases), and ``craft_core.memory_plan.plan_memory``'s
estimate for the same configuration next to it. A second table gives bytes per anchor at real size
for every policy type (pi0_fast, pi0, pi05, smolvla) from the adapters' store layout on models built
on the ``meta`` device (no memory, no compute), and a third the memory plan before activations of each
GPU preset's train stage on CUDA (``--preset-plans``; the figures the presets' headers state).

Precision: ``--dtype auto`` computes in bfloat16 only where the CPU has native bf16 matrix units
(AVX512-BF16 / AMX); elsewhere PyTorch's bf16 CPU matmul is a slow fallback (measured and reported
as ``bf16_matmul_slowdown``) and the run computes in float32 (the policies' own default dtype).

Cost at real size (lerobot 0.6.1 builds pi0_fast with 3.45 G parameters, pi0 4.03 G, pi05 4.14 G,
smolvla 0.45 G): float32 weights alone are 13.8 GB for pi0_fast and 16.1 / 16.6 GB for pi0 / pi05, so
on a 24 GB machine without native bf16 only pi0_fast (barely) and smolvla fit; pi0 / pi05 are
opt-in (``--policies pi0``). pi0_fast's anchor pass includes greedy decoding of 255 FAST tokens.
``--tiny-smoke`` runs exactly this code on craft's tiny policies (a check that it runs, in a minute).

Last stdout line: one JSON object (``policies``: one entry per policy run, ``error`` if it failed;
``bytes_per_anchor``: per policy type). A run's cache half is also printed (``CHILD_PARTIAL``) as
soon as it is measured.

    .venv/bin/python benchmarks/bench_fullsize.py [--policies smolvla pi0_fast] [--targets prefix] [--anchors 1]
    .venv/bin/python benchmarks/bench_fullsize.py --tiny-smoke --layout-types
"""

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CAMERAS = ("observation.images.base_0_rgb", "observation.images.left_wrist_0_rgb")
STATE_DIM, ACTION_DIM, IMAGE_SIZE = 8, 7, 224
TASK = "pick up the red block and put it in the box"
LORA_RANK = 16
# Attention query/value projections of every transformer (VLM, vision tower, action expert): pi0_fast
# has no lerobot default targets, and pi0's defaults (expert only) would leave the prefix unanchorable.
LORA_TARGETS = ["q_proj", "v_proj"]

# SmolVLM2-500M-Video-Instruct (smolvla_base's backbone, lerobot's default vlm_model_name): the
# sizes of its published config.json, written locally because the hub is not reachable.
SMOLVLM2_500M = {
    "text": {"vocab_size": 49280, "hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
             "num_attention_heads": 15, "num_key_value_heads": 5, "head_dim": 64, "rms_norm_eps": 1e-5,
             "rope_theta": 100000.0, "max_position_embeddings": 8192},
    "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "patch_size": 16, "image_size": 512},
    "scale_factor": 4,
}


# ------------------------------------------------------------------------------------------ utils


def gib(value: float) -> float:
    return round(value / 2**30, 3)


def native_bf16() -> bool:
    flags = ""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        pass
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def bf16_matmul_slowdown(rows: int = 64, width: int = 1024) -> float:
    """Seconds of a bf16 CPU matmul over the same fp32 one, at a transformer-like shape
    (``rows`` tokens through a ``width`` x ``width`` projection; tiny shapes hide the gap)."""
    import torch

    def timed(dtype):
        a, b = torch.randn(rows, width, dtype=dtype), torch.randn(width, width, dtype=dtype)
        a @ b  # warm-up
        start = time.perf_counter()
        a @ b
        return time.perf_counter() - start

    return timed(torch.bfloat16) / timed(torch.float32)


def write_dataset(root: Path, n_frames: int, seed: int = 0):
    """A small real LeRobotDataset: two cameras at 224 px, 8-d state, 7-d action, one task."""
    import numpy as np
    from lerobot.datasets import LeRobotDataset

    features = {
        **{key: {"dtype": "image", "shape": (IMAGE_SIZE, IMAGE_SIZE, 3), "names": ["height", "width", "channels"]}
           for key in CAMERAS},
        "observation.state": {"dtype": "float32", "shape": (STATE_DIM,), "names": [f"s{i}" for i in range(STATE_DIM)]},
        "action": {"dtype": "float32", "shape": (ACTION_DIM,), "names": [f"a{i}" for i in range(ACTION_DIM)]},
    }
    dataset = LeRobotDataset.create("bench/fullsize", fps=10, features=features, root=root, use_videos=False)
    rng = np.random.default_rng(seed)
    position = rng.uniform(-1, 1, size=STATE_DIM).astype(np.float32)
    for _ in range(n_frames):
        frame = {key: rng.integers(0, 256, size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8) for key in CAMERAS}
        frame["observation.state"] = position.copy()
        frame["action"] = (position[:ACTION_DIM] + rng.normal(scale=0.1, size=ACTION_DIM)).astype(np.float32)
        frame["task"] = TASK
        dataset.add_frame(frame)
        position = position + rng.normal(scale=0.05, size=STATE_DIM).astype(np.float32)
    dataset.save_episode()
    dataset.finalize()
    return dataset.meta


# ---------------------------------------------------------------------- real-size policy configs


def real_config(policy_type: str, work: Path, dtype: str):
    """The lerobot config of ``policy_type`` at its defaults, tokenizers pointed at local folders."""
    from craft_core.demo.tiny.tokenizers import write_fast_action_tokenizer, write_text_tokenizer

    if policy_type == "pi0_fast":
        from lerobot.policies.pi0_fast.configuration_pi0_fast import PI0FastConfig

        # PaliGemma's vocabulary size, so FAST tokens map onto the real embedding rows' range.
        text = write_text_tokenizer(work / "tok_text", [TASK], vocab_size=257152)
        fast = write_fast_action_tokenizer(work / "tok_fast", time_horizon=PI0FastConfig.chunk_size,
                                           action_dim=ACTION_DIM, vocab_size=2048)
        return PI0FastConfig(text_tokenizer_name=str(text), action_tokenizer_name=str(fast), dtype=dtype,
                             validate_action_token_prefix=False, device="cpu", push_to_hub=False)
    if policy_type in ("pi0", "pi05"):
        if policy_type == "pi0":
            from lerobot.policies.pi0.configuration_pi0 import PI0Config as Config
        else:
            from lerobot.policies.pi05.configuration_pi05 import PI05Config as Config
        return Config(dtype=dtype, device="cpu", push_to_hub=False)
    if policy_type == "smolvla":
        from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

        vlm = write_smolvlm(work / "smolvlm")
        # smolvla_base trains the expert only (VLM frozen): prefix anchoring could not move anything
        # (craft refuses it), so the VLM is trainable here, as in the tiny smolvla.
        return SmolVLAConfig(vlm_model_name=str(vlm), load_vlm_weights=False, train_expert_only=False,
                             freeze_vision_encoder=False, device="cpu", push_to_hub=False)
    raise ValueError(f"unknown policy type {policy_type!r}")


def write_smolvlm(folder: Path) -> Path:
    """A local SmolVLM folder at SmolVLM2-500M's sizes: config, a small tokenizer, the processor."""
    from transformers import SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor
    from transformers.models.auto import AutoTokenizer

    from craft_core.demo.tiny.tokenizers import write_text_tokenizer
    from craft_core.policies.smolvla.tiny import SMOLVLM_SPECIAL_TOKENS

    sizes = SMOLVLM2_500M
    write_text_tokenizer(folder, [TASK], vocab_size=1024, extra_special_tokens=SMOLVLM_SPECIAL_TOKENS)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = SmolVLMConfig(
        text_config={"model_type": "llama", **sizes["text"], "pad_token_id": tokenizer.pad_token_id,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id},
        vision_config=sizes["vision"], scale_factor=sizes["scale_factor"],
        image_token_id=tokenizer.convert_tokens_to_ids(SMOLVLM_SPECIAL_TOKENS["image_token"]),
        pad_token_id=tokenizer.pad_token_id,
    )
    config.save_pretrained(folder)
    vision = sizes["vision"]
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(size={"longest_edge": vision["image_size"]},
                                              max_image_size={"longest_edge": vision["image_size"]},
                                              do_image_splitting=False),
        video_processor=SmolVLMVideoProcessor(), tokenizer=tokenizer,
        image_seq_len=(vision["image_size"] // vision["patch_size"]) ** 2 // sizes["scale_factor"] ** 2,
    )
    processor.save_pretrained(folder)
    return folder


def processors_context(policy_type: str):
    """pi0/pi05 processors load ``google/paligemma-3b-pt-224`` by name: a local snapshot stands in."""
    import contextlib

    if policy_type in ("pi0", "pi05"):
        from craft_core.policies.pi0.tiny import local_paligemma_tokenizer

        return local_paligemma_tokenizer()
    return contextlib.nullcontext()


# ------------------------------------------------------------------ what the prefix looks like


class PrefixProbe:
    """Captures, during one forward, the policy's own prefix construction and what the adapter pools.

    Policy side: every ``embed_image`` call of the VLM wrapper (tokens per camera) and the sequence
    length of ``embed_prefix``/``embed_prefix_fast``. Adapter side: the masks handed to
    ``craft_core.pooling.pool_hidden_states``.
    """

    def __init__(self, policy):
        self.policy = policy
        self.image_tokens: list[int] = []
        self.prefix_lengths: list[int] = []
        self.fast_tokens: list[int] = []
        self.pooled: list[dict] = []
        self._undo = []

    def _wrap(self, owner, name, after):
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            out = original(*args, **kwargs)
            after(out)
            return out

        setattr(owner, name, wrapped)
        self._undo.append((owner, name))

    def __enter__(self):
        import craft_core.pooling as pooling

        model = self.policy.model
        backbone = getattr(model, "paligemma_with_expert", None) or getattr(model, "vlm_with_expert")
        self._wrap(backbone, "embed_image", lambda out: self.image_tokens.append(int(out.shape[1])))
        if hasattr(model, "embed_prefix_fast"):
            def fast(out):
                self.prefix_lengths.append(int(out[0].shape[1]) - int(out[4]))  # minus the FAST tokens
                self.fast_tokens.append(int(out[4]))
            self._wrap(model, "embed_prefix_fast", fast)
        else:
            self._wrap(model, "embed_prefix", lambda out: self.prefix_lengths.append(int(out[0].shape[1])))
        real_pool = pooling.pool_hidden_states

        def pool(hidden, image_mask, text_mask, strategies):
            self.pooled.append({"hidden_shape": list(hidden.shape), "image_tokens": image_mask.sum(1).tolist(),
                                "text_tokens": text_mask.sum(1).tolist(), "length": int(image_mask.shape[1])})
            return real_pool(hidden, image_mask, text_mask, strategies)

        pooling.pool_hidden_states = pool
        self._undo.append((pooling, "pool_hidden_states", real_pool))
        return self

    def __exit__(self, *exc):
        for item in reversed(self._undo):
            if len(item) == 3:
                setattr(item[0], item[1], item[2])
            else:
                delattr(item[0], item[1])  # the instance attribute shadowing the method


# ------------------------------------------------------------------------------- store sizes


def store_bytes(store_url: str) -> dict:
    """Per store array: bytes per anchor raw (dtype x shape) and as stored (its chunk files on disk)."""
    import zarr

    group = zarr.open_group(store_url, mode="r")
    out = {}
    for path, array in group.members(max_depth=None):
        if not isinstance(array, zarr.Array) or not array.shape:
            continue
        n = array.shape[0]
        folder = Path(store_url) / path
        stored = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.name != "zarr.json")
        out[path] = {"shape": list(array.shape[1:]), "dtype": str(array.dtype),
                     "raw_bytes_per_anchor": int(array.nbytes // n), "stored_bytes_per_anchor": stored / n}
    return out


def per_target(arrays: dict) -> dict:
    totals: dict[str, dict] = {}
    for path, entry in arrays.items():
        head = path.split("/")[0]
        key = path.split("/")[1] if head == "targets" else head
        group = totals.setdefault(key, {"raw": 0, "stored": 0.0})
        group["raw"] += entry["raw_bytes_per_anchor"]
        group["stored"] += entry["stored_bytes_per_anchor"]
    return totals


def meta_policy(policy_type: str, work: Path, dtype: str = "float32", options: dict | None = None):
    """The real-size lerobot policy on the ``meta`` device (shapes and dtypes, no memory), with the
    policy ``options`` a preset's ``train.policy`` sets."""
    import torch
    from lerobot.datasets import LeRobotDatasetMetadata
    from lerobot.policies.factory import get_policy_class
    from lerobot.utils.feature_utils import dataset_to_policy_features

    cfg = real_config(policy_type, work, dtype)
    for name, value in (options or {}).items():
        setattr(cfg, name, value)
    meta = work.parent / "layout_dataset"
    ds_meta = LeRobotDatasetMetadata("bench/fullsize", root=meta) if meta.exists() else write_dataset(meta, 4)
    features = dataset_to_policy_features(ds_meta.features)
    cfg.output_features = {k: f for k, f in features.items() if k == "action"}
    cfg.input_features = {k: f for k, f in features.items() if k != "action"}
    cfg.device = "meta"  # the PaliGemma policies move their model to config.device in __init__
    with torch.device("meta"):
        return get_policy_class(policy_type)(cfg)


def preset_plans(work: Path, names: list[str]) -> dict:
    """The memory plan of each GPU preset's train stage on CUDA, before activations (which need a real
    forward: the train stage measures them on its first batch), from the real-size model on ``meta``."""
    from craft_core.config import load_preset
    from craft_core.memory_plan import plan_memory

    out = {}
    for name in names:
        cfg = load_preset(name)
        train = cfg.train
        options = dict(train.policy)
        dtype = options.pop("dtype", "float32")
        policy = meta_policy("pi0_fast", work / f"preset_{name}", dtype, options)
        plan = plan_memory(policy, batch_size=train.batch_size, precision=train.mixed_precision,
                           peft=train.peft.model_dump() if train.peft is not None else None,
                           retention=train.retention is not None, tokens_per_sample=1, device="cuda")
        fixed = plan.total - plan.activations
        out[name] = {**{k: gib(getattr(plan, k)) for k in ("weights", "gradients", "optimizer", "retention_buffer")},
                     "before_activations_gib": gib(fixed), "trainable_params": plan.trainable_params,
                     "total_params": plan.total_params, "policy_dtype": dtype}
    return out


def layout_bytes(policy_type: str, work: Path, targets: list[str], layers: list[int], pooling: list[str]) -> dict:
    """Bytes per anchor of the store layout at real size, from the adapter on a ``meta``-device model."""
    from craft_core.config import ActionOutputConfig
    from craft_core.policies import get_adapter
    from craft_core.policies.base import TargetRequest
    from craft_core.store.layout import bytes_per_anchor

    policy = meta_policy(policy_type, work / f"layout_{policy_type}")
    adapter = get_adapter(policy)
    wanted = [t for t in targets if t in adapter.retention_targets]
    defaults = ActionOutputConfig()  # the cache stage's defaults: top-k 8, the policy's own flow steps
    request = TargetRequest(targets=tuple(wanted), layers=tuple(adapter.resolve_layers(layers)), pooling=tuple(pooling),
                            top_k=defaults.top_k, flow_steps=defaults.flow_steps, dtype="float16", noise_seed=0)
    out = {"inputs": {name: bytes_per_anchor(spec) for name, spec in adapter.input_spec(wanted).items()}}
    for target in wanted:
        arrays, _ = adapter.target_spec(target, request)
        out[target] = {name: bytes_per_anchor(spec) for name, spec in arrays.items()}
    out["total"] = sum(sum(v.values()) for v in out.values())
    out["params"] = sum(p.numel() for p in policy.parameters())
    return out


# ---------------------------------------------------------------------------- one policy, child


def run_policy(policy_type: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from lerobot.datasets import LeRobotDataset, LeRobotDatasetMetadata
    from lerobot.datasets.factory import resolve_delta_timestamps
    from lerobot.policies.factory import make_policy, make_pre_post_processors

    import craft_core.extraction as extraction
    from craft_core.config import CacheConfig, DatasetSource, PeftSettings, PolicySource, RetentionConfig, TrainConfig
    from craft_core.memory_plan import plan_memory, process_memory_bytes, reset_peak_resident
    from craft_core.policies import get_adapter
    from craft_core.retention import open_retention

    result: dict = {"policy": policy_type}
    work = Path(args.workdir)
    compute_dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if native_bf16() else "float32")
    result["dtype"] = compute_dtype
    n_frames = max(4, args.anchors + 2)
    ds_root = work / "dataset"
    ds_meta = write_dataset(ds_root, n_frames) if not ds_root.exists() else LeRobotDatasetMetadata("bench/fullsize", root=ds_root)
    result["rss_before_model_gib"] = gib(process_memory_bytes("VmRSS"))
    start = time.perf_counter()
    if args.tiny_smoke:  # the same code path on craft's tiny offline policy (a check that it runs, not a figure)
        from craft_core.demo.tiny import build_tiny_policy
        from craft_core.policy_io import load_policy, make_processors

        folder = build_tiny_policy(policy_type, work / policy_type / "tiny", ds_meta=ds_meta, extra_texts=[TASK])
        policy = load_policy(folder, ds_meta=ds_meta)
        preprocessor, _ = make_processors(policy, dataset_stats=ds_meta.stats, pretrained_path=folder)
        cfg = policy.config
    else:
        cfg = real_config(policy_type, work / policy_type, compute_dtype)
        with processors_context(policy_type):
            policy = make_policy(cfg, ds_meta=ds_meta)
            preprocessor, _ = make_pre_post_processors(cfg, dataset_stats=ds_meta.stats)
    result["build_s"] = round(time.perf_counter() - start, 1)
    policy.eval().requires_grad_(False)
    result["params_total"] = sum(p.numel() for p in policy.parameters())
    result["param_dtypes"] = sorted({str(p.dtype).removeprefix("torch.") for p in policy.parameters()})
    weights = sum(p.numel() * p.element_size() for p in policy.parameters())
    result["weights_gib"] = gib(weights)
    result["config"] = {k: getattr(cfg, k) for k in ("chunk_size", "tokenizer_max_length", "max_action_tokens",
                                                     "image_resolution", "resize_imgs_with_padding", "num_vlm_layers",
                                                     "paligemma_variant", "action_expert_variant")
                        if hasattr(cfg, k)}

    # The teacher "folder": its config (the store records and checks the teacher's identity).
    teacher_dir = work / policy_type / "teacher"
    if args.tiny_smoke:
        teacher_dir = folder
    else:
        teacher_dir.mkdir(parents=True, exist_ok=True)
        cfg._save_pretrained(teacher_dir)
        policy.config.pretrained_path = str(teacher_dir)  # lerobot's PEFT refuses a policy without one
    teacher = PolicySource(path=str(teacher_dir))

    # --- cache: one anchor batch through the cache stage's code --------------------------------
    adapter = get_adapter(policy)
    targets = [t for t in args.targets if t in adapter.retention_targets]
    store_url = str(work / policy_type / "anchors.zarr")
    cache_cfg = CacheConfig(teacher=teacher, dataset=DatasetSource(repo_id="bench/fullsize", root=str(ds_root)),
                            n_anchors=args.anchors, batch_size=args.anchors, chunk_anchors=args.anchors,
                            heldout_fraction=0.0, device="cpu", targets=targets, dtype="float16")
    marks: list[float] = []
    real_load = extraction._load_teacher
    extraction._load_teacher = lambda *a, **k: (policy, preprocessor)  # the model built above, not re-read
    reset_peak_resident()
    try:
        with PrefixProbe(policy) as probe:
            extraction.extract_anchors(cache_cfg, store_url, progress=lambda done, total, m: marks.append(time.perf_counter()))
    finally:
        extraction._load_teacher = real_load
    result["extract_s_per_anchor"] = round((marks[-1] - marks[0]) / args.anchors, 1)
    result["extract_peak_rss_gib"] = gib(process_memory_bytes("VmHWM"))
    n_cameras = len(CAMERAS)
    pooled = probe.pooled[0] if probe.pooled else None
    result["prefix"] = {
        "cameras": n_cameras,
        "policy_image_tokens_per_camera": sorted(set(probe.image_tokens)),
        "policy_prefix_length": sorted(set(probe.prefix_lengths)),
        "policy_fast_tokens": sorted(set(probe.fast_tokens)) or None,
        "adapter_image_tokens_per_camera": [n / n_cameras for n in pooled["image_tokens"]] if pooled else None,
        "adapter_prefix_length": pooled["length"] if pooled else None,
        "adapter_text_tokens": pooled["text_tokens"] if pooled else None,
        "adapter_hidden_shape": pooled["hidden_shape"] if pooled else None,
    }
    if pooled:
        own_tokens = probe.image_tokens[0]
        result["prefix"]["agree"] = (all(n == own_tokens * n_cameras for n in pooled["image_tokens"])
                                     and pooled["length"] in probe.prefix_lengths)
    arrays = store_bytes(store_url)
    result["store_arrays"] = arrays
    result["store_per_target"] = per_target(arrays)

    print("CHILD_PARTIAL " + json.dumps(result), flush=True)  # the cache half, should the step not finish

    # --- train: one CRaFT retention step on LoRA adapters ---------------------------------------
    from accelerate import Accelerator
    from lerobot.optim.factory import make_optimizer_and_scheduler

    from craft_core.train import _OptimizerSettings, base_policy, update_policy, wrap_with_peft

    train_cfg = TrainConfig(dataset=cache_cfg.dataset, steps=1, batch_size=1, device="cpu", seed=0,
                            peft=PeftSettings(rank=LORA_RANK, target_modules=LORA_TARGETS) if args.lora else None,
                            retention=RetentionConfig(every_k=1, targets={t: {} for t in targets}, anchor_batch_size=1))
    policy.train()
    if args.lora:
        student = wrap_with_peft(policy, train_cfg.peft, teacher)
    else:
        policy.requires_grad_(True)
        student = policy
    inner = base_policy(student)
    params = [p for p in student.parameters() if p.requires_grad]
    result["params_trainable"] = sum(p.numel() for p in params)
    retention = open_retention(train_cfg.retention, store_url, adapter=get_adapter(inner), teacher=teacher, seed=0,
                               total_steps=1)
    dataset = LeRobotDataset("bench/fullsize", root=ds_root, delta_timestamps=resolve_delta_timestamps(cfg, ds_meta))
    batch = preprocessor(torch.utils.data.default_collate([dataset[0]]))
    settings = _OptimizerSettings(train_cfg, student)
    optimizer, scheduler = make_optimizer_and_scheduler(settings, student)
    accelerator = Accelerator(cpu=True)
    plan = plan_memory(inner, batch_size=1, precision="no", peft=train_cfg.peft, retention=True,
                       tokens_per_sample=max(probe.prefix_lengths) + max(probe.fast_tokens or [0]) + int(cfg.chunk_size))
    result["memory_plan"] = {k: (gib(v) if isinstance(v, int) and k not in ("trainable_params", "total_params") else v)
                             for k, v in plan.as_dict().items() if k != "notes"}
    rss_before_step = process_memory_bytes("VmRSS")
    reset_peak_resident()
    start = time.perf_counter()
    stats = update_policy(student, batch, step=0, optimizer=optimizer, lr_scheduler=scheduler, accelerator=accelerator,
                          params=params, grad_clip_norm=settings.optimizer.grad_clip_norm or 0.0, retention=retention)
    result["retention_step_s"] = round(time.perf_counter() - start, 1)
    peak = process_memory_bytes("VmHWM")
    result["step"] = {"task_loss": stats.task_loss, "retention_losses": stats.retention_losses,
                      "grad_norm": stats.grad_norm, "surgery_cosine": stats.surgery.cosine if stats.surgery else None}
    result["step_rss_before_gib"] = gib(rss_before_step)
    result["step_peak_rss_gib"] = gib(peak)
    # Comparable with the plan: the model's weights + what the step added on top of the RSS before it.
    result["step_measured_gib"] = gib(weights + peak - rss_before_step)
    result["plan_total_over_measured"] = round(plan.total / (weights + peak - rss_before_step), 3)
    result["process_peak_rss_gib"] = gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return result


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Default: what fits 16 GB and 20 minutes on a 2-core CPU without native bf16 (measured 2026-12-02:
    # smolvla ~6 min, 4.6 GiB; pi0_fast's cache half alone 8 min and 14.4 GiB, its fp32 step > 16 GiB).
    parser.add_argument("--policies", nargs="+", default=["smolvla"])
    parser.add_argument("--anchors", type=int, default=1, help="anchors extracted (one batch)")
    parser.add_argument("--targets", nargs="+", default=["prefix", "action_output"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--no-lora", dest="lora", action="store_false")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layout-types", nargs="*", default=["pi0_fast", "pi0", "pi05", "smolvla"])
    parser.add_argument("--preset-plans", nargs="*", default=["pi0fast_libero", "pi0fast_libero_lora", "pi0fast_aloha"],
                        help="GPU presets whose memory plan before activations is computed on the meta device")
    parser.add_argument("--tiny-smoke", action="store_true",
                        help="run the same code on craft's tiny policies (checks the benchmark runs; no real-size figure)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        try:
            print("CHILD_RESULT " + json.dumps(run_policy(args.child, args)), flush=True)
        except Exception as exc:  # reported, not hidden: the parent records the failure per policy
            import traceback

            traceback.print_exc()
            print("CHILD_RESULT " + json.dumps({"policy": args.child, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return

    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    summary: dict = {"machine": {"cpus": os.cpu_count(), "native_bf16": native_bf16(),
                                 "bf16_matmul_slowdown": round(bf16_matmul_slowdown(), 1)}}
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_fullsize_") as tmp:
        work = Path(tmp)
        summary["bytes_per_anchor"] = {}
        for policy_type in args.layout_types:
            summary["bytes_per_anchor"][policy_type] = layout_bytes(
                policy_type, work, args.targets, [-2, -1], ["vision_token_mean", "text_token_last"])
        summary["preset_plans"] = preset_plans(work, args.preset_plans)
        print(json.dumps({"preset_plans": summary["preset_plans"]}), file=sys.stderr, flush=True)
        for policy_type in args.policies:
            child_work = work / f"run_{policy_type}"
            child_work.mkdir()
            command = [sys.executable, __file__, "--child", policy_type, "--workdir", str(child_work),
                       "--anchors", str(args.anchors), "--dtype", args.dtype, "--threads", str(args.threads),
                       "--targets", *args.targets] + ([] if args.lora else ["--no-lora"]) + (
                           ["--tiny-smoke"] if args.tiny_smoke else [])
            t0 = time.perf_counter()
            proc = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("CHILD_RESULT ")]
            run = json.loads(lines[-1].removeprefix("CHILD_RESULT ")) if lines else {
                "policy": policy_type, "error": f"exit {proc.returncode}: {proc.stderr[-2000:]}"}
            run["wall_s"] = round(time.perf_counter() - t0, 1)
            if "error" in run:
                print(proc.stderr[-4000:], file=sys.stderr)
            print(json.dumps(run), file=sys.stderr, flush=True)
            runs.append(run)
    summary["policies"] = runs
    summary.update(tiny_smoke=args.tiny_smoke, anchors=args.anchors, lora_rank=LORA_RANK if args.lora else None,
                   lora_targets=LORA_TARGETS if args.lora else None, targets=args.targets,
                   torch_threads=args.threads, wall_s=round(time.perf_counter() - started, 1),
                   load_average_1min_start=load_start, load_average_1min_end=os.getloadavg()[0])
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
