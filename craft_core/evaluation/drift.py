"""Drift: how far a policy moved from the teacher on the anchor store's targets.

Measured on the store's held-out anchors (never used as a training constraint), for every target
the store holds: the pooled prefix hidden states (mse and cosine distance, with the same adapter,
absolute layers and pooling strategies the store was built with) and the action outputs (their
retention loss). The teacher itself drifts by ~0 (exactly 0 up to float rounding with a float32
store; a float16 store adds its own storage rounding, ~1e-7 in mse for unit-scale activations).
"""

from dataclasses import replace
from collections.abc import Iterable

import torch
from torch import Tensor

from craft_core.devices import autocast_context


class DriftAccumulator:
    """Running per-(layer, pooled vector) sums of mse and cosine distance over anchors.

    Distances are computed in float64: the teacher-vs-teacher case must come out at rounding
    level, and ``1 - cos`` in float32 alone is ~1e-7 for identical vectors.
    """

    def __init__(self, layers: list[int], pooling: list[str]):
        self.layers = list(layers)
        self.pooling = list(pooling)
        self.n = 0
        self.mse_sum = torch.zeros(len(layers), len(pooling), dtype=torch.float64)
        self.cos_sum = torch.zeros(len(layers), len(pooling), dtype=torch.float64)

    def add(self, student: Tensor, teacher: Tensor) -> None:
        if student.shape != teacher.shape:
            raise ValueError(
                f"pooled hidden states of the evaluated policy have shape {tuple(student.shape)} but the "
                f"store's teacher_hidden has {tuple(teacher.shape)} ([B, layers, pooled, hidden])"
            )
        s = student.detach().to("cpu", torch.float64)
        t = teacher.detach().to("cpu", torch.float64)
        self.mse_sum += ((s - t) ** 2).mean(dim=-1).sum(dim=0)
        cosine_distance = 1.0 - torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-12)
        self.cos_sum += cosine_distance.clamp_min(0.0).sum(dim=0)  # rounding can give cos > 1 by 1e-16
        self.n += s.shape[0]

    def result(self) -> dict:
        if self.n == 0:
            raise ValueError("no held-out anchors were read: nothing to measure drift on")
        mse = self.mse_sum / self.n
        cos = self.cos_sum / self.n
        per_vector = [
            {"layer": layer, "pooling": strategy, "mse": float(mse[i, j]), "cosine": float(cos[i, j])}
            for i, layer in enumerate(self.layers)
            for j, strategy in enumerate(self.pooling)
        ]
        return {
            "n_anchors": self.n,
            "layers": self.layers,
            "pooling": self.pooling,
            # Means over all layers and pooled vectors: the retention loss's own reduction.
            "mse": float(mse.mean()),
            "cosine": float(cos.mean()),
            "per_vector": per_vector,
        }


def measure_drift(
    policy,
    batches: Iterable[tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]],
    request,
    *,
    autocast: str | None = None,
) -> dict:
    """Drift of ``policy`` over ``(stored inputs, stored targets)`` batches of held-out anchors.

    ``prefix``: mse and cosine distance of the pooled hidden states, per (layer, pooled vector);
    every other target of ``request``: its retention loss (KL for FAST distributions, velocity mse
    for flow matching), averaged over anchors. ``autocast`` ("bfloat16") repeats the extraction's
    autocast (the store's ``compute.autocast``, on any device, as the retention forward does), so
    that the teacher is compared with outputs computed the way it computed them.
    """
    from craft_core.policies import get_adapter

    adapter = get_adapter(policy)
    prefix = "prefix" in request.targets
    others = [t for t in request.targets if t != "prefix"]
    accumulator = DriftAccumulator(list(request.layers), list(request.pooling)) if prefix else None
    sums = {target: 0.0 for target in others}
    n = 0
    was_training = policy.training
    policy.eval()
    try:
        with torch.no_grad(), autocast_context(adapter.device.type, autocast):
            for inputs, stored in batches:
                batch_size = len(next(iter(inputs.values())))
                if prefix:
                    student = adapter.pooled(inputs, request.layers, request.pooling)
                    accumulator.add(student, torch.as_tensor(stored["prefix"]["hidden"]))
                if others:
                    losses = adapter.retention_losses(inputs, stored, replace(request, targets=tuple(others)))
                    for target in others:
                        sums[target] += float(losses[target]) * batch_size
                n += batch_size
    finally:
        policy.train(was_training)
    result = accumulator.result() if prefix else {"n_anchors": n, "mse": None, "cosine": None, "per_vector": []}
    result["targets"] = {"prefix": result["mse"]} if prefix else {}
    result["targets"].update({target: total / max(n, 1) for target, total in sums.items()})
    return result


class HeldoutAnchors:
    """The held-out split of an anchor store, validated once, measured per evaluated policy."""

    def __init__(self, store_url: str, split: str = "heldout"):
        from craft_core.store import open_anchor_store

        store = open_anchor_store(store_url)
        self.split = split
        self.url = store.url
        self.info = store.info()
        self.request = store.request()
        if split == "heldout" and self.info["n_heldout"] == 0:
            raise ValueError(
                f"anchor store {self.url} has no held-out anchors, so drift cannot be measured without using "
                f"training anchors. Re-run the cache stage with cache.heldout_fraction > 0, or set eval.drift=false."
            )
        # How extraction computed the teacher vectors ({"device_type", "autocast"}); older stores lack it.
        self.compute = dict(store.attrs.get("compute") or {})

    def check_policy_type(self, policy_type: str, run: str) -> None:
        """Refuse a run whose policy type differs from the store's teacher (config.json alone tells)."""
        teacher_type = (self.info.get("teacher") or {}).get("policy_type")
        if teacher_type not in (None, policy_type):
            raise ValueError(
                f"run {run!r} is a {policy_type} policy but anchor store {self.url} holds hidden states of a "
                f"{teacher_type} teacher: drift compares a policy with its own teacher. Evaluate drift "
                f"against a store made from this run's base model, or set eval.drift=false."
            )

    def for_policy(self, policy):
        """The held-out anchors as the policy will read them; fails now if they do not fit it."""
        from craft_core.policies import get_adapter
        from craft_core.store import AnchorDataset, check_fits_student

        dataset = AnchorDataset(self.url, split=self.split, validate=False)  # validated when opened
        # Policy type, depth, hidden size, prefix inputs and layers against the store's teacher.
        check_fits_student(dataset.store, get_adapter(policy))
        return dataset

    def drift(self, policy, dataset, batch_size: int) -> dict:
        """Drift of ``policy`` on every anchor of ``dataset``'s split (from :meth:`for_policy`)."""
        batches = ((batch["inputs"], batch["targets"]) for batch in dataset.loader(batch_size, shuffle=False))
        result = measure_drift(policy, batches, self.request, autocast=self.compute.get("autocast"))
        result["teacher_hidden_dtype"] = self.info["dtype"]
        result["teacher_compute"] = self.compute
        return result


def open_heldout(store_url: str, split: str = "heldout") -> HeldoutAnchors:
    return HeldoutAnchors(store_url, split)


def drift_columns(result: dict, name: str) -> dict[str, float | None]:
    """Flat report columns of one drift result: ``drift_<name>`` (prefix mse), ``drift_<name>_cosine``
    and ``drift_<name>_<target>`` for every other target."""
    columns = {}
    if result.get("mse") is not None:
        columns[f"drift_{name}"] = result["mse"]
        columns[f"drift_{name}_cosine"] = result["cosine"]
    for target, value in (result.get("targets") or {}).items():
        if target != "prefix":
            columns[f"drift_{name}_{target}"] = value
    return columns
