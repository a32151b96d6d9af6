"""Stage 1, the cache: run the frozen teacher once over anchor frames and store its retention targets.

    frames of a LeRobotDataset ──policy preprocessor──▶ adapter.anchor_inputs ──▶ inputs/* (uint8 images, tokens)
                                                                │
                          adapter.teacher_targets(stored inputs) ──▶ targets/prefix/hidden [N, L, V, D]
                                                                 ──▶ targets/action_output/* (probes + outputs)

The teacher's targets are computed from the *stored* inputs (images already quantised to uint8),
not from the float batch, so a student that is a copy of the teacher reproduces them exactly.
``cache.targets`` chooses them: ``prefix`` (pooled prefix hidden states, the seed's method) and
``action_output`` (the teacher's outputs on the action path on stored probes); see the adapters.

Anchors are chosen deterministically from (seed, n_anchors, episodes, frame_stride) and stored in
that seeded random order; batches never cross a block boundary, so a block's values do not depend
on where a run started, which worker wrote it or whether the run was resumed. Blocks already
marked written are skipped (resume after a kill), ``shard=(i, n)`` writes only worker i's blocks,
and ``complete`` is set last by :func:`craft_core.store.finalize_store`.
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from craft_core.config import CacheConfig, DatasetSource, DriftSetConfig, semantic
from craft_core.devices import autocast_context, resolve_device
from craft_core.noise import progress_bars
from craft_core.store import (
    MARKERS,
    AnchorStoreWriter,
    StoreLayout,
    block_ranges,
    finalize_store,
    heldout_mask,
    input_path,
    open_anchor_store,
    store_fingerprint,
    target_path,
    worker_blocks,
)

STORE_NAME = "anchors.zarr"
ANCHOR_INDEX = "craft.anchor_index"

Progress = Callable[[int, int, dict], None]


# ---------------------------------------------------------------- anchor selection


@dataclass
class AnchorSelection:
    rows: np.ndarray  # positions in the (episode-filtered) LeRobotDataset, in store order
    episode_index: np.ndarray
    frame_index: np.ndarray
    prompts: list[str] | None  # per anchor when the user gave prompts, else the dataset's task strings


def select_anchors(dataset, cfg: CacheConfig) -> AnchorSelection:
    """Every ``frame_stride``-th frame of each selected episode, then ``n_anchors`` of them in seeded order."""
    columns = dataset.hf_dataset.select_columns(["episode_index", "frame_index"]).with_format("numpy")
    episode_index = np.asarray(columns["episode_index"], dtype=np.int64).reshape(-1)
    frame_index = np.asarray(columns["frame_index"], dtype=np.int64).reshape(-1)
    candidates = np.flatnonzero(frame_index % cfg.frame_stride == 0)
    if cfg.n_anchors > len(candidates):
        episodes = cfg.dataset.episodes if cfg.dataset.episodes is not None else "all"
        raise ValueError(
            f"cache.n_anchors={cfg.n_anchors} but dataset {cfg.dataset.repo_id} offers only {len(candidates)} "
            f"frames (episodes {episodes}, frame_stride {cfg.frame_stride}); lower n_anchors or frame_stride, "
            "or select more episodes"
        )
    rows = np.random.default_rng(cfg.seed).choice(candidates, size=cfg.n_anchors, replace=False)
    prompts = None
    if cfg.prompts is not None:
        if not cfg.prompts or any(not p.strip() for p in cfg.prompts):
            raise ValueError("cache.prompts must be a non-empty list of non-empty strings (or null for the dataset's tasks)")
        prompts = [cfg.prompts[i % len(cfg.prompts)] for i in range(cfg.n_anchors)]
    return AnchorSelection(rows=rows, episode_index=episode_index[rows], frame_index=frame_index[rows], prompts=prompts)


class AnchorFrames(torch.utils.data.Dataset):
    """The selected frames as the policy's preprocessor takes them: observations and the prompt."""

    def __init__(self, dataset, selection: AnchorSelection):
        self.dataset = dataset
        self.selection = selection

    def __len__(self) -> int:
        return len(self.selection.rows)

    def __getitem__(self, anchor: int) -> dict:
        frame = self.dataset[int(self.selection.rows[anchor])]
        # Only what the prefix needs: with an action, pi0_fast's preprocessor would also tokenise it.
        item = {key: value for key, value in frame.items() if key.startswith("observation.")}
        item["task"] = self.selection.prompts[anchor] if self.selection.prompts else frame["task"]
        item[ANCHOR_INDEX] = anchor  # seeds per-anchor probe noise; removed before the preprocessor
        return item


# ---------------------------------------------------------------- identities and fingerprint


def _file_digest(path: Path, window: int = 2**20) -> str:
    """Size + hash of the first and last MiB: cheap for multi-GB weights, and changes with them."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        digest.update(handle.read(window))
        if size > window:
            handle.seek(max(size - window, window))
            digest.update(handle.read(window))
    return digest.hexdigest()[:16]


def teacher_identity(cfg: CacheConfig, policy) -> dict:
    path = Path(cfg.teacher.path).expanduser()
    identity = {
        "policy_type": policy.config.type,
        "path": str(path.absolute()) if path.exists() else cfg.teacher.path,
        "revision": cfg.teacher.revision,
        "dtype": str(next(policy.parameters()).dtype).removeprefix("torch."),
    }
    if path.is_dir():
        identity["content"] = {name: _file_digest(path / name) for name in ("config.json", "model.safetensors")
                               if (path / name).is_file()}
    return identity


def dataset_identity(cfg: CacheConfig, dataset) -> dict:
    meta = dataset.meta
    stats = json.dumps(meta.stats, sort_keys=True, default=lambda v: np.asarray(v).tolist())
    return {
        "repo_id": cfg.dataset.repo_id,
        "root": str(Path(cfg.dataset.root).expanduser().absolute()) if cfg.dataset.root else None,
        "revision": cfg.dataset.revision,
        "episodes": cfg.dataset.episodes,
        "total_episodes": int(meta.total_episodes),
        "total_frames": int(meta.total_frames),
        "fps": int(meta.fps),
        "stats_sha256": hashlib.sha256(stats.encode()).hexdigest()[:16],
    }


def cache_fingerprint(cfg: CacheConfig, teacher: dict, dataset: dict, compute: dict, chunk_anchors: int, *,
                      normalization: str = "anchor_dataset", task_dataset: DatasetSource | None = None) -> str:
    # Where and how fast it ran is not what it holds: the resolved device type and autocast are
    # in `compute`, the shared non-semantic settings are dropped.
    content = semantic(cfg.model_dump(mode="json", exclude={"device", "store_root"}), "cache")
    content["chunk_anchors"] = chunk_anchors
    # The local path is where the teacher is, not what it is: its content digest identifies it.
    if "content" in teacher:
        teacher = {k: v for k, v in teacher.items() if k != "path"}
        content["teacher"].pop("path")
    dataset = {k: v for k, v in dataset.items() if k != "root"}
    content["dataset"].pop("root")
    payload = {"config": content, "teacher": teacher, "dataset": dataset, "compute": compute}
    if normalization != "anchor_dataset":  # stores made before the choice existed keep their fingerprint
        payload["normalization"] = {"statistics": normalization,
                                    "task_dataset": task_dataset.repo_id if task_dataset is not None else None}
    return store_fingerprint(payload)


# ---------------------------------------------------------------- the stage


def _load_dataset(cfg: CacheConfig):
    from lerobot.datasets import LeRobotDataset

    source = cfg.dataset
    return LeRobotDataset(
        source.repo_id, root=source.root, episodes=source.episodes, revision=source.revision,
        video_backend=source.video_backend,
    )


def anchor_statistics(cfg: CacheConfig, dataset, normalization: str, task_dataset: DatasetSource | None) -> tuple[dict | None, str]:
    """The statistics anchors are normalised with (None = the teacher's saved ones) and their name.

    They are those the fine-tuned student will be saved with (``train.normalization``, see
    craft_core.normalization), so the stored inputs are what its own pipeline makes of the anchor
    frames: pi0_fast and pi05 even put the normalised state into the prompt. Under ``task`` the
    student gets the new task's statistics, which would show the teacher foreign inputs; the
    anchors then keep the anchor dataset's own statistics (the teacher's view of its task).
    """
    from craft_core.normalization import fine_tuning_stats

    if normalization == "task":
        return dataset.meta.stats, "anchor_dataset"
    return fine_tuning_stats(normalization, task_dataset=task_dataset, anchor_dataset=cfg.dataset), normalization


def _load_teacher(cfg: CacheConfig, stats: dict | None, device: torch.device, policy_options: dict | None = None):
    from craft_core.policy_io import load_policy, make_processors

    policy = load_policy(cfg.teacher, device=device, options=policy_options)
    preprocessor, _ = make_processors(policy, pretrained_path=cfg.teacher.path, dataset_stats=stats,
                                      rename_map=cfg.dataset.rename_map)
    return policy, preprocessor


def extraction_autocast(cfg: CacheConfig, device: torch.device) -> str | None:
    """The autocast dtype name of the teacher's forward (``cache.autocast``), None for none."""
    if cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda"):
        return "bfloat16"
    return None


def extract_anchors(
    cfg: CacheConfig,
    store_url: str,
    *,
    progress: Progress | None = None,
    shard: tuple[int, int] | None = None,
    normalization: str = "task",
    task_dataset: DatasetSource | None = None,
    policy_options: dict | None = None,
) -> dict:
    """Write the anchor store at ``store_url`` (resuming it if present); returns the StoreInfo dict.

    ``policy_options`` (``train.policy``) are set on the teacher's lerobot config too, so anchors are
    made by the policy the student will be; settings under which anchoring cannot constrain
    anything (prefix anchoring with the VLM frozen) are refused here, before any extraction.

    ``normalization`` (``train.normalization`` of the pipeline: task, teacher or union) and
    ``task_dataset`` choose the statistics the anchors are normalised with (``anchor_statistics``);
    the default keeps the anchor dataset's own.

    With ``shard=(i, n)`` only worker i's blocks are written and the store is left incomplete;
    once every worker is done, :func:`craft_core.store.finalize_store` checks it and sets
    ``complete``. Without it the store is finalised here.
    """
    from craft_core.policies import get_adapter
    from craft_core.policies.base import TargetRequest

    device = resolve_device(cfg.device, field="cache.device")
    dataset = _load_dataset(cfg)
    selection = select_anchors(dataset, cfg)
    stats, stats_name = anchor_statistics(cfg, dataset, normalization, task_dataset)
    policy, preprocessor = _load_teacher(cfg, stats, device, policy_options)
    from craft_core.policy_options import check_anchoring

    check_anchoring(policy.config, cfg.targets, options=policy_options)
    adapter = get_adapter(policy)
    try:
        adapter.check_targets(cfg.targets)
        layers = adapter.resolve_layers(cfg.layers) if "prefix" in cfg.targets else []
    except ValueError as exc:
        field = "cache.targets" if "target" in str(exc) else "cache.layers"
        raise ValueError(f"{field}: {exc}") from None
    autocast = extraction_autocast(cfg, device)
    compute = {"device_type": device.type, "autocast": autocast}
    request = TargetRequest(
        targets=tuple(cfg.targets), layers=tuple(layers), pooling=tuple(cfg.pooling),
        top_k=cfg.action_output.top_k, flow_steps=cfg.action_output.flow_steps, dtype=cfg.dtype, noise_seed=cfg.seed,
    )
    target_specs = {target: adapter.target_spec(target, request) for target in cfg.targets}

    teacher = teacher_identity(cfg, policy)
    data_id = dataset_identity(cfg, dataset)
    layout = StoreLayout(
        n_anchors=cfg.n_anchors,
        input_spec=adapter.input_spec(cfg.targets),
        targets={target: arrays for target, (arrays, _) in target_specs.items()},
        target_attrs={target: attrs for target, (_, attrs) in target_specs.items()},
        chunk_anchors=cfg.chunk_anchors,
        shard_chunks=cfg.shard_chunks,
    )
    layout.attrs = {
        "teacher": teacher,
        "layers": layers,
        "depth": adapter.depth,
        "hidden_size": adapter.hidden_size,
        "pooling": list(cfg.pooling) if "prefix" in cfg.targets else [],
        "dtype": cfg.dtype,
        "noise_seed": cfg.seed,
        "dataset": data_id,
        "sampling": {"n_anchors": cfg.n_anchors, "seed": cfg.seed, "episodes": cfg.dataset.episodes,
                     "frame_stride": cfg.frame_stride, "heldout_fraction": cfg.heldout_fraction,
                     "prompts": cfg.prompts},
        "compute": compute,
        "normalization": {"statistics": stats_name,
                          "task_dataset": task_dataset.model_dump(mode="json") if stats_name == "union" else None},
        "fingerprint": cache_fingerprint(cfg, teacher, data_id, compute, layout.chunk_anchors,
                                         normalization=stats_name, task_dataset=task_dataset),
    }
    if shard is not None:
        n_blocks = len(block_ranges(layout.n_anchors, layout.block_anchors))
        if shard[1] > n_blocks:
            raise ValueError(
                f"cache.num_shards={shard[1]} is larger than the store's {n_blocks} block(s) ({layout.n_anchors} anchors, "
                f"{layout.block_anchors} per block); lower cache.num_shards to at most {n_blocks} or set a smaller "
                "cache.chunk_anchors"
            )
    writer = AnchorStoreWriter(store_url, layout)
    if writer.group.attrs.get("complete"):
        return open_anchor_store(store_url).info()

    mine = worker_blocks(len(writer.blocks), shard)
    todo = [block for block in mine if block not in writer.written_blocks()]
    total = sum(writer.blocks[b][1] - writer.blocks[b][0] for b in mine)
    done = total - sum(writer.blocks[b][1] - writer.blocks[b][0] for b in todo)
    split = heldout_mask(cfg.n_anchors, cfg.heldout_fraction)

    # Batches never cross a block: block values are then independent of resume point and worker.
    batches = [
        list(range(start, min(start + cfg.batch_size, writer.blocks[b][1])))
        for b in todo for start in range(writer.blocks[b][0], writer.blocks[b][1], cfg.batch_size)
    ]
    loader = torch.utils.data.DataLoader(
        AnchorFrames(dataset, selection), batch_sampler=batches, num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
    )
    bar = tqdm(total=total, initial=done, desc="teacher anchors", unit="anchor", dynamic_ncols=True,
               disable=not progress_bars())
    if progress is not None:
        progress(done, total, {"blocks_done": len(mine) - len(todo), "blocks_total": len(mine)})
    started, resumed_at = time.perf_counter(), done
    pending: dict[str, list[np.ndarray]] = {}
    blocks_left = iter(todo)
    block = next(blocks_left, None)
    in_flight: tuple[Future, int, int] | None = None  # (write, block, anchors) being written

    def wait_for_write() -> None:
        nonlocal done
        future, written_block, n = in_flight
        future.result()  # re-raises a failed write here
        done += n
        bar.update(n)
        if progress is not None:
            rate = (done - resumed_at) / max(time.perf_counter() - started, 1e-9)
            progress(done, total, {"block": written_block, "anchors_per_s": rate})

    amp = autocast_context(device.type, autocast)
    # One writer thread: block b is compressed and written while block b+1 is computed.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="anchor-store-writer") as io:
        with torch.inference_mode(), amp:
            for batch in loader:
                anchor_ids = batch.pop(ANCHOR_INDEX)
                inputs = adapter.anchor_inputs(preprocessor(batch), cfg.targets)
                outputs = {input_path(name): value.numpy() for name, value in inputs.items()}
                # Targets come from the stored (quantised) inputs, which is what a student will see.
                targets = adapter.teacher_targets(inputs, request, anchor_ids=anchor_ids)
                for target, arrays in targets.items():
                    for name, value in arrays.items():
                        values = (value.float() if value.is_floating_point() else value).numpy()
                        outputs[target_path(target, name)] = values.astype(layout.targets[target][name].dtype)
                outputs["provenance/task"] = np.asarray(batch["task"], dtype=str)
                for name, value in outputs.items():
                    pending.setdefault(name, []).append(value)
                start, stop = writer.blocks[block]
                if sum(len(part) for part in pending["provenance/task"]) < stop - start:
                    continue
                arrays = {name: np.concatenate(parts) for name, parts in pending.items()}
                arrays["provenance/episode_index"] = selection.episode_index[start:stop]
                arrays["provenance/frame_index"] = selection.frame_index[start:stop]
                arrays["split/heldout"] = split[start:stop]
                if in_flight is not None:
                    wait_for_write()
                in_flight = (io.submit(writer.write_block, block, arrays), block, stop - start)
                pending = {}
                block = next(blocks_left, None)
        if in_flight is not None:
            wait_for_write()
    bar.close()
    if shard is not None:
        return {"store_url": str(store_url), "shard": list(shard), "blocks_written": len(todo), "complete": False}
    return finalize_store(store_url)


DRIFT_STORES_DIR = "drift_sets"


def store_location(cfg: CacheConfig, out_dir: Path) -> str:
    """Where the cache stage's anchor store lives: ``<out_dir>/anchors.zarr``, or with ``cache.store_root``
    ``<store_root>/<stage fingerprint>/anchors.zarr`` (the stage directory is named by its fingerprint)."""
    if cfg.store_root is None:
        return str(Path(out_dir) / STORE_NAME)
    return f"{cfg.store_root.rstrip('/')}/{Path(out_dir).name}/{STORE_NAME}"


def _written_markers(store_url: str) -> np.ndarray | None:
    """The store's per-block written markers, or None when there is no store (yet) or it is complete."""
    from craft_core.store.layout import open_group

    try:
        group = open_group(store_url, "r")
        if group.attrs.get("complete"):
            return None
        return np.asarray(group[MARKERS][:])
    except Exception:  # absent, or not created far enough to hold markers
        return None


def _store_complete(store_url: str) -> bool:
    from craft_core.store.layout import open_group

    try:
        return bool(open_group(store_url, "r").attrs.get("complete"))
    except Exception:
        return False


def shard_done(store_url: str, shard: int, num_shards: int) -> bool:
    """Whether every block of worker ``shard`` of ``num_shards`` is written (or the whole store complete)."""
    if _store_complete(store_url):
        return True
    markers = _written_markers(store_url)
    if markers is None:
        return False
    mine = worker_blocks(len(markers), (shard, num_shards))
    return bool(mine) and bool(markers[mine].all())


def shard_device(requested: str, shard: int) -> str:
    """The device of shard ``shard`` on this machine: with several visible GPUs, shards take turns over them."""
    import torch

    if requested in ("auto", "cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return f"cuda:{shard % torch.cuda.device_count()}"
    return requested


def extract_shard(cfg: CacheConfig, *, store_url: str, shard: int, num_shards: int, normalization: str,
                  task_dataset: DatasetSource | None, progress: Progress | None = None,
                  policy_options: dict | None = None) -> dict:
    """One shard of the cache stage: worker ``shard`` of ``num_shards`` writes its blocks of the store.

    A shard whose blocks are all written returns at once (its result is cached by the store itself);
    a killed one, run again alone, resumes at its first unwritten block.
    """
    if shard_done(store_url, shard, num_shards):
        return {"store_url": store_url, "shard": [shard, num_shards], "blocks_written": 0, "complete": False}
    cfg = cfg.model_copy(update={"device": shard_device(cfg.device, shard)})
    return extract_anchors(cfg, store_url, progress=progress, shard=(shard, num_shards),
                           normalization=normalization, task_dataset=task_dataset, policy_options=policy_options)


def cache_shard_stage(cfg: CacheConfig, *, normalization: str, task_dataset: DatasetSource | None,
                      drift_sets: list[DriftSetConfig], upstream: dict[str, dict], out_dir: Path, shard: int,
                      progress: Progress | None = None, policy_options: dict | None = None) -> dict:
    """One shard of the pipeline's cache stage, writing into the store :func:`cache_stage` then finalizes."""
    return extract_shard(cfg, store_url=store_location(cfg, out_dir), shard=shard, num_shards=cfg.num_shards,
                         normalization=normalization, task_dataset=task_dataset, progress=progress,
                         policy_options=policy_options)


def cache_stage(cfg: CacheConfig, *, normalization: str, task_dataset: DatasetSource | None,
                drift_sets: list[DriftSetConfig], upstream: dict[str, dict], out_dir: Path,
                progress: Progress | None = None, policy_options: dict | None = None) -> dict:
    """The pipeline's cache stage: the anchor store at ``<out_dir>/anchors.zarr`` (or under ``cache.store_root``),
    plus one evaluation-only store per ``eval.drift_sets`` entry (``<out_dir>/drift_sets/<name>.zarr``: the same
    teacher, targets, layers and statistics on other frames, e.g. held-out episodes); returns the StoreInfo.

    After sharded extraction (``cache.num_shards`` shard runs) every block is written and this only checks
    the store and sets it complete (:func:`finalize_store`), without loading the teacher; any block still
    missing (a shard that was not run) is extracted here first.
    """
    url = store_location(cfg, out_dir)
    markers = _written_markers(url)
    if markers is not None and len(markers) and markers.all():
        info = finalize_store(url)
    elif cfg.store_root is not None and _store_complete(url):  # e.g. made by another machine's pipeline run
        info = open_anchor_store(url).info()
    else:
        info = extract_anchors(cfg, url, progress=progress, normalization=normalization, task_dataset=task_dataset,
                               policy_options=policy_options)
    drift_stores = {}
    for drift_set in drift_sets:
        drift_url = str(Path(out_dir) / DRIFT_STORES_DIR / f"{drift_set.name}.zarr")
        extract_anchors(cfg.model_copy(update={"dataset": drift_set.dataset, "n_anchors": drift_set.n_anchors,
                                               "heldout_fraction": 0.0, "prompts": None, "frame_stride": 1}),
                        drift_url, normalization=normalization, task_dataset=task_dataset,
                        policy_options=policy_options)
        drift_stores[drift_set.name] = drift_url
    return {**info, "store_url": url, "drift_stores": drift_stores}
