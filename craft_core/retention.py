"""The retention side of CRaFT's training step: anchor batches, the retention loss, λ and ε.

``Retention`` is everything a retention step needs besides the model: the anchor store's training
split as batches of (stored model inputs, teacher targets), the loss that compares the student
with those targets, the Lagrange multiplier λ and the bound ε(t). ``open_retention`` validates
the store against the student first (``craft_core.store.check_fits_student``): a store that does
not fit is refused, never silently ignored (the first CRaFT tool fell back to baseline training).
"""

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from craft_core.config import PolicySource, RetentionConfig
from craft_core.dual import EpsilonSchedule, LagrangeMultiplier


class RetentionSetupError(RuntimeError):
    """Retention is on but the anchor store cannot be used for this student (never falls back)."""


class Anchors:
    """The anchor store as the training loop sees it.

    ``batches(start)`` yields ``(inputs, targets)`` forever from the store's training split in
    chunk-aware order, skipping the first ``start`` batches (resume) without reading them. Every
    rank draws the same global batch and keeps its own slice, so N ranks together see exactly the
    batch that one process with N times the anchor batch size sees. ``targets`` are the teacher's
    pooled hidden states ``[B, L, V, D]`` (``hidden_state``) or its label tokens (``token_level``).
    """

    def __init__(self, store_url: str, *, kind: str, layers: list[int], pooling: list[str], batch_size: int,
                 seed: int, rank: int, world_size: int, shuffle_window_chunks: int):
        from craft_core.store import AnchorDataset

        self.dataset = AnchorDataset(store_url, split="train", validate=False)  # validated by open_retention
        self.kind = kind
        self.layers = layers
        self.pooling = pooling
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.sampler = self.dataset.sampler(batch_size * world_size, window_chunks=shuffle_window_chunks,
                                            shuffle=True, drop_last=True, seed=seed)
        if len(self.sampler) == 0:
            raise RetentionSetupError(
                f"anchor store {store_url} has {len(self.dataset)} training anchors, fewer than one batch of "
                f"train.retention.anchor_batch_size={batch_size} x {world_size} process(es); lower "
                "anchor_batch_size or build a larger cache (cache.n_anchors)"
            )

    def batches(self, start: int = 0) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
        done, epoch = 0, 0
        while True:
            self.sampler.set_epoch(epoch)
            for positions in self.sampler:
                done += 1
                if done <= start:
                    continue
                mine = positions[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
                batch = torch.utils.data.default_collate(self.dataset.__getitems__(mine))
                yield batch["inputs"], batch["teacher_hidden" if self.kind == "hidden_state" else "labels"]
            epoch += 1

    def loss(self, adapter, inputs: dict[str, Tensor], targets: Tensor, kind: str) -> Tensor:
        from craft_core.losses import retention_loss

        if self.kind == "token_level":
            # The policy's own loss on the teacher's label tokens (distillation of its outputs).
            return adapter.token_level_loss(inputs, targets)
        student = adapter.pooled(inputs, self.layers, self.pooling)
        return retention_loss(student, targets.to(student.device), kind)


class Retention:
    """Anchors, loss settings, λ (dual ascent) and ε(t) of one CRaFT run."""

    def __init__(self, cfg: RetentionConfig, anchors: Anchors, adapter, *, total_steps: int):
        self.cfg = cfg
        self.anchors = anchors
        self.adapter = adapter
        self.lam = LagrangeMultiplier(cfg.lambda_init, cfg.lambda_lr, cfg.lambda_max)
        self.epsilon = EpsilonSchedule(cfg.eps_start, cfg.eps_end, cfg.eps_decay_steps, cfg.eps_schedule,
                                       total_steps=total_steps)
        self.batches_done = 0
        self._batches: Iterator | None = None

    @property
    def cache_type(self) -> str:
        return self.anchors.kind

    def is_retention_step(self, step: int) -> bool:
        return step % self.cfg.every_k == 0

    def next_loss(self) -> Tensor:
        """The retention loss of the student on the next anchor batch (differentiable)."""
        if self._batches is None:
            self._batches = self.anchors.batches(start=self.batches_done)
        inputs, targets = next(self._batches)
        self.batches_done += 1
        return self.anchors.loss(self.adapter, inputs, targets, self.cfg.loss)

    def state_dict(self) -> dict:
        return {"lambda": self.lam.state_dict(), "epsilon": self.epsilon.state_dict(),
                "anchor_batches": self.batches_done}

    def load_state_dict(self, state: dict) -> None:
        self.lam.load_state_dict(state["lambda"])
        self.epsilon.load_state_dict(state["epsilon"])
        self.batches_done = int(state["anchor_batches"])
        self._batches = None


def open_retention(cfg: RetentionConfig, store_url: str, *, adapter, teacher: PolicySource, seed: int,
                   total_steps: int, rank: int = 0, world_size: int = 1) -> Retention:
    """Open and validate the anchor store for this student; refuse anything that does not fit."""
    from craft_core.store import AnchorStoreError, check_fits_student, open_anchor_store

    try:
        # Completeness, schema and values, then: kind, policy type, depth, hidden size, the prefix
        # inputs and the layers, all against this student.
        store = open_anchor_store(store_url)
        check_fits_student(store, adapter)
    except AnchorStoreError as exc:
        raise RetentionSetupError(
            f"retention is on but the anchor store cannot be used (craft never falls back to baseline "
            f"training): {exc}"
        ) from exc
    stored_teacher = store.attrs.get("teacher") or {}
    if not _same_policy_source(stored_teacher, teacher):
        raise RetentionSetupError(
            f"anchor store {store_url} does not fit this run: its teacher is {stored_teacher.get('path')!r} "
            f"(revision {stored_teacher.get('revision')!r}) but the student starts from {teacher.path!r} (revision "
            f"{teacher.revision!r}). Re-run the cache stage with this run's teacher or point train at the matching "
            "store; craft never falls back to baseline training."
        )
    anchors = Anchors(store_url, kind=store.kind, layers=list(store.attrs.get("layers") or []),
                      pooling=list(store.attrs.get("pooling") or []), batch_size=cfg.anchor_batch_size,
                      seed=seed, rank=rank, world_size=world_size, shuffle_window_chunks=cfg.shuffle_window_chunks)
    return Retention(cfg, anchors, adapter, total_steps=total_steps)


def _same_policy_source(stored: dict, teacher: PolicySource) -> bool:
    def canonical(path) -> str:
        local = Path(str(path)).expanduser()
        return str(local.resolve()) if local.exists() else str(path)

    return canonical(stored.get("path")) == canonical(teacher.path) and stored.get("revision") == teacher.revision
