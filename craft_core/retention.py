"""The retention side of CRaFT's training step: anchor batches, one loss per target, λ_t and ε_t.

``Retention`` is everything a retention step needs besides the model: the anchor store's training
split as batches of (stored model inputs, stored teacher targets), the targets this run constrains
(each ``L_t <= ε_t(t)`` with its own Lagrange multiplier λ_t and annealed bound ε_t), and the
adapter request that computes every target's loss from one forward over the anchor batch.
``open_retention`` validates the store against the student first
(``craft_core.store.check_fits_student``): a store that does not fit is refused, never silently
ignored (the first CRaFT tool fell back to baseline training).
"""

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from craft_core.config import PolicySource, RetentionConfig
from craft_core.devices import autocast_context
from craft_core.dual import EpsilonSchedule, LagrangeMultiplier
from craft_core.policies.base import TargetRequest


class RetentionSetupError(RuntimeError):
    """Retention is on but the anchor store cannot be used for this student (never falls back)."""


class Anchors:
    """The anchor store as the training loop sees it.

    ``batches(start)`` yields ``(inputs, targets)`` forever from the store's training split in
    chunk-aware order, skipping the first ``start`` batches (resume) without reading them. Every
    rank draws the same global batch and keeps its own slice, so N ranks together see exactly the
    batch that one process with N times the anchor batch size sees. ``targets`` maps each target
    to its stored arrays ``{target: {array: tensor [B, ...]}}``.
    """

    def __init__(self, store_url: str, *, targets: list[str], batch_size: int, seed: int, rank: int,
                 world_size: int, shuffle_window_chunks: int):
        from craft_core.store import AnchorDataset

        # Target values were verified when open_retention opened the store; inputs are verified as read.
        self.dataset = AnchorDataset(store_url, split="train", validate=False, targets=targets)
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

    def batches(self, start: int = 0) -> Iterator[tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]]:
        done, epoch = 0, 0
        while True:
            self.sampler.set_epoch(epoch)
            for positions in self.sampler:
                done += 1
                if done <= start:
                    continue
                mine = positions[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
                batch = torch.utils.data.default_collate(self.dataset.__getitems__(mine))
                yield batch["inputs"], batch["targets"]
            epoch += 1


class TargetDual:
    """One target's constraint ``L_t <= ε_t(t)``: its multiplier λ_t and its bound's schedule."""

    def __init__(self, cfg: RetentionConfig, target: str, *, total_steps: int):
        settings = cfg.constraint(target)
        self.loss = settings.loss
        self.lam = LagrangeMultiplier(settings.lambda_init, settings.lambda_lr, settings.lambda_max)
        self.epsilon = EpsilonSchedule(settings.eps_start, settings.eps_end, settings.eps_decay_steps,
                                       settings.eps_schedule, total_steps=total_steps)


class Retention:
    """Anchors, the constrained targets with their λ_t and ε_t, and the merge settings of one CRaFT run."""

    def __init__(self, cfg: RetentionConfig, anchors: Anchors, adapter, request: TargetRequest, *, total_steps: int,
                 autocast: str | None = None):
        self.cfg = cfg
        # The autocast dtype the teacher's targets were extracted under (the store's compute.autocast):
        # the student's retention forward runs under the same, or a copy of the teacher would not
        # reproduce them (fp32 student vs bf16 teacher) and the keystone invariant would break.
        self.autocast = autocast
        self.anchors = anchors
        self.adapter = adapter
        self.request = request
        self.targets = list(request.targets)
        self.duals = {target: TargetDual(cfg, target, total_steps=total_steps) for target in self.targets}
        self.batches_done = 0
        self._batches: Iterator | None = None

    @property
    def cache_type(self) -> str:
        """What the run is anchored on, for logs: ``prefix``, ``action_output`` or ``prefix+action_output``."""
        return "+".join(self.targets)

    def is_retention_step(self, step: int) -> bool:
        return step % self.cfg.every_k == 0

    def lambdas(self) -> dict[str, float]:
        return {target: dual.lam.value for target, dual in self.duals.items()}

    def epsilons(self, step: int) -> dict[str, float]:
        return {target: dual.epsilon(step) for target, dual in self.duals.items()}

    def merge_weight(self, target: str) -> float:
        """The weight of L_t inside the one retention gradient ``∇ Σ_t w_t L_t``.

        ``weighted``: w_t = λ_t (g = g_t + Σ λ_t ∇L_t); ``task_priority``: min(λ_t, 1); ``equal``: 1
        (g = ½ (g_t + Σ ∇L_t)).
        """
        lam = self.duals[target].lam.value
        if self.cfg.merge == "equal":
            return 1.0
        if self.cfg.merge == "task_priority":
            return min(lam, 1.0)
        return lam

    def next_losses(self) -> dict[str, Tensor]:
        """Every target's loss of the student on the next anchor batch (differentiable), one forward."""
        if self._batches is None:
            self._batches = self.anchors.batches(start=self.batches_done)
        inputs, targets = next(self._batches)
        self.batches_done += 1
        with self.amp():
            return self.adapter.retention_losses(inputs, targets, self.request)

    def amp(self):
        """The extraction's autocast on the student's device (a no-op for a store extracted without one)."""
        return autocast_context(self.adapter.device.type, self.autocast)

    def dual_step(self, losses: dict[str, float], step: int) -> None:
        """λ_t <- clip(λ_t + η_t (L_t - ε_t(step)), 0, λ_max_t) for every target."""
        for target, dual in self.duals.items():
            dual.lam.update(losses[target], dual.epsilon(step))

    def state_dict(self) -> dict:
        return {
            "targets": {target: {"lambda": dual.lam.state_dict(), "epsilon": dual.epsilon.state_dict()}
                        for target, dual in self.duals.items()},
            "anchor_batches": self.batches_done,
        }

    def load_state_dict(self, state: dict) -> None:
        saved = state["targets"]
        if sorted(saved) != sorted(self.duals):
            raise RetentionSetupError(f"the checkpoint constrains targets {sorted(saved)}, this run {sorted(self.duals)}")
        for target, dual in self.duals.items():
            dual.lam.load_state_dict(saved[target]["lambda"])
            dual.epsilon.load_state_dict(saved[target]["epsilon"])
        self.batches_done = int(state["anchor_batches"])
        self._batches = None


def open_retention(cfg: RetentionConfig, store_url: str, *, adapter, teacher: PolicySource, seed: int,
                   total_steps: int, rank: int = 0, world_size: int = 1) -> Retention:
    """Open and validate the anchor store for this student; refuse anything that does not fit."""
    from craft_core.store import AnchorStoreError, check_fits_student, open_anchor_store

    try:
        store = open_anchor_store(store_url)  # structure, identity, every target block against its digest
        targets = list(cfg.targets) if cfg.targets is not None else list(store.targets)
        # Policy type, depth, hidden size, inputs, layers and every target's layout, against this student.
        check_fits_student(store, adapter, targets=targets)
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
    request = store.request(targets, prefix_loss=cfg.constraint("prefix").loss)
    anchors = Anchors(store_url, targets=targets, batch_size=cfg.anchor_batch_size, seed=seed, rank=rank,
                      world_size=world_size, shuffle_window_chunks=cfg.shuffle_window_chunks)
    autocast = (store.attrs.get("compute") or {}).get("autocast")
    return Retention(cfg, anchors, adapter, request, total_steps=total_steps, autocast=autocast)


def _same_policy_source(stored: dict, teacher: PolicySource) -> bool:
    def canonical(path) -> str:
        local = Path(str(path)).expanduser()
        return str(local.resolve()) if local.exists() else str(path)

    return canonical(stored.get("path")) == canonical(teacher.path) and stored.get("revision") == teacher.revision
