"""How much memory a training run needs, before it starts.

``plan_memory(policy, batch_size=..., precision=..., peft=..., retention=...)`` adds up, in bytes:

- ``weights``: every parameter and buffer as it sits in the model (accelerate's mixed precision
  keeps float32 master weights; autocast only changes the compute dtype), plus LoRA adapter
  weights when ``peft`` asks for adapters the policy does not carry yet;
- ``gradients``: one ``.grad`` per trainable parameter (adapter parameters only under PEFT);
- ``optimizer``: AdamW's two moments per trainable parameter (lerobot's presets are AdamW);
- ``retention_buffer``: CRaFT's one gradient-sized retention buffer (``craft_core.surgery`` keeps
  no other copy) when retention is on, else 0;
- ``activations``: what autograd keeps for the backward pass of one (micro-)batch. Measured when a
  sample ``batch`` is given: one forward of the policy's loss under the run's autocast, counting
  the bytes of every distinct tensor saved for backward, scaled linearly to ``batch_size``. Without
  a batch it is estimated from the Linear layers: each saves its input, ``tokens_per_sample`` ×
  ``in_features`` activations per sample, doubled for norms, nonlinearities and attention.

``total`` is the sum: an upper bound on the peak (activations are freed as the backward pass
writes the gradients, and the retention forward runs after the task activations are gone).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch

__all__ = ["MemoryPlan", "MemoryPlanError", "check_fits_device", "format_bytes", "plan_memory"]

_LOW_PRECISION = {"bf16": 2, "fp16": 2}
_ADAMW_MOMENTS = 2
# Each Linear saves its input for backward; norms, nonlinearities, residual adds and attention
# probabilities keep about as much again (measured on the tiny policies against the probe).
_ACTIVATION_FACTOR = 2.0


class MemoryPlanError(RuntimeError):
    """The planned memory does not fit the device."""


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes a training run needs, by kind; ``total`` is their sum."""

    weights: int
    gradients: int
    optimizer: int
    retention_buffer: int
    activations: int
    trainable_params: int = 0
    total_params: int = 0
    notes: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.retention_buffer + self.activations

    def as_dict(self) -> dict:
        data = asdict(self)
        data["total"] = self.total
        return data

    def summary(self) -> str:
        """One line for logs and stage summaries."""
        parts = ", ".join(f"{name} {format_bytes(getattr(self, name))}"
                          for name in ("weights", "gradients", "optimizer", "retention_buffer", "activations"))
        share = f"{self.trainable_params:,} of {self.total_params:,} parameters trainable"
        return f"memory plan: total {format_bytes(self.total)} ({parts}; {share})"

    def markdown(self) -> str:
        rows = ["| memory | bytes | human |", "|---|---|---|"]
        for name in ("weights", "gradients", "optimizer", "retention_buffer", "activations", "total"):
            value = getattr(self, name)
            rows.append(f"| {name} | {value} | {format_bytes(value)} |")
        return "\n".join(rows)


def format_bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _peft_field(peft, name: str, default=None):
    if peft is None:
        return default
    if isinstance(peft, dict):
        return peft.get(name, default)
    return getattr(peft, name, default)


def _is_peft_wrapped(policy: torch.nn.Module) -> bool:
    return any("lora_" in name for name, _ in policy.named_parameters())


def _target_matches(name: str, target_modules) -> bool:
    """PEFT's module matching: a string is a full-match regex, a list matches names or name suffixes."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in target_modules)


def _lora_params(policy: torch.nn.Module, peft) -> tuple[int, list[torch.nn.Linear]]:
    """Adapter parameter count (rank r: ``r * (in + out)`` per targeted Linear) and the Linears it targets."""
    rank = int(_peft_field(peft, "rank", None) or _peft_field(peft, "r", None) or 16)
    targets = _peft_field(peft, "target_modules", None)
    if targets is None and hasattr(policy, "_get_default_peft_targets"):
        targets = (policy._get_default_peft_targets() or {}).get("target_modules")
    if targets is None:
        raise MemoryPlanError(f"{getattr(policy, 'name', type(policy).__name__)} has no default PEFT target modules; "
                              "set train.peft.target_modules")
    linears = [m for n, m in policy.named_modules() if isinstance(m, torch.nn.Linear) and _target_matches(n, targets)]
    return sum(rank * (m.in_features + m.out_features) for m in linears), linears


def measure_activations(policy: torch.nn.Module, batch: dict, *, precision: str = "no") -> int:
    """Bytes autograd saves for backward in one forward of ``policy(batch)`` (the policy's training loss).

    Distinct storages are counted once (a tensor saved by several ops is one allocation). Runs
    under the autocast ``precision`` names; leaves no gradient behind.
    """
    seen: dict[tuple, int] = {}

    def pack(tensor: torch.Tensor):
        if tensor.device.type != "meta":
            try:
                storage = tensor.untyped_storage()
                seen[(storage.data_ptr(), tensor.device.type)] = storage.nbytes()
            except (RuntimeError, NotImplementedError):  # e.g. sparse or functional tensors
                seen[(id(tensor), "x")] = tensor.numel() * tensor.element_size()
        return tensor

    device = next(policy.parameters()).device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    amp = torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type, enabled=False)
    was_training = policy.training
    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]
    weights = {p.untyped_storage().data_ptr() for p in policy.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        loss, _ = policy(batch)
    del loss
    policy.train(was_training)
    for p in params:
        p.grad = None
    # Parameters saved by their ops are the weights, not activations.
    return sum(nbytes for (ptr, _), nbytes in seen.items() if ptr not in weights)


def _batch_size_of(batch: dict) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError("memory plan: the sample batch holds no batched tensor")


def estimate_activations(policy: torch.nn.Module, *, batch_size: int, precision: str, tokens_per_sample: int) -> int:
    """Activations of one batch from the model's Linear layers (no forward pass): see the module doc."""
    width = sum(m.in_features for m in policy.modules() if isinstance(m, torch.nn.Linear))
    element = _LOW_PRECISION.get(precision, 4)
    return int(_ACTIVATION_FACTOR * batch_size * tokens_per_sample * width * element)


def plan_memory(policy: torch.nn.Module, *, batch_size: int, precision: str = "no", peft=None,
                retention: bool = False, batch: dict | None = None, tokens_per_sample: int | None = None,
                optimizer_moments: int = _ADAMW_MOMENTS) -> MemoryPlan:
    """The memory plan of training ``policy`` (see the module doc).

    ``precision``: ``no``/``bf16``/``fp16`` (train.mixed_precision). ``peft``: None, or the PEFT
    settings (``rank``/``r``, ``target_modules``; None targets = the policy's lerobot defaults); a
    policy already wrapped with adapters is planned as it is. ``retention``: CRaFT on. ``batch``: a
    preprocessed sample batch to measure activations with (preferred); else ``tokens_per_sample``
    drives the estimate. ``batch_size`` is the micro-batch one forward sees (per process).
    """
    if precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"precision={precision!r}: choose no, bf16 or fp16")
    params = list(policy.parameters())
    weights = _tensor_bytes(params) + _tensor_bytes(policy.buffers())
    total_params = sum(p.numel() for p in params)
    notes: dict = {"precision": precision, "batch_size": batch_size}
    if peft is not None and not _is_peft_wrapped(policy):
        adapter_params, linears = _lora_params(policy, peft)
        trainable = adapter_params
        param_bytes = 4
        weights += adapter_params * param_bytes
        total_params += adapter_params
        notes["peft_modules"] = len(linears)
    elif peft is not None or any(not p.requires_grad for p in params) and any(p.requires_grad for p in params):
        trainable_tensors = [p for p in params if p.requires_grad]
        trainable = sum(p.numel() for p in trainable_tensors)
        param_bytes = trainable_tensors[0].element_size() if trainable_tensors else 4
    else:  # a frozen (teacher-style) module is planned as fully trainable: that is what fine-tuning does
        trainable = total_params
        param_bytes = params[0].element_size() if params else 4
    gradients = trainable * param_bytes
    optimizer = optimizer_moments * trainable * param_bytes
    retention_buffer = gradients if retention else 0
    if batch is not None:
        probe = _batch_size_of(batch)
        activations = int(math.ceil(measure_activations(policy, batch, precision=precision) * batch_size / probe))
        notes["activations"] = f"measured on a batch of {probe}, scaled to {batch_size}"
    else:
        if tokens_per_sample is None:
            raise ValueError("memory plan: give a sample batch or tokens_per_sample to size the activations")
        activations = estimate_activations(policy, batch_size=batch_size, precision=precision,
                                           tokens_per_sample=tokens_per_sample)
        notes["activations"] = f"estimated for {tokens_per_sample} tokens per sample"
    return MemoryPlan(weights=weights, gradients=gradients, optimizer=optimizer, retention_buffer=retention_buffer,
                      activations=activations, trainable_params=trainable, total_params=total_params, notes=notes)


def check_fits_device(plan: MemoryPlan, device: torch.device | str, *, headroom: float = 0.95) -> None:
    """On CUDA, refuse a plan larger than the device's free memory (× ``headroom``); elsewhere a no-op."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(device)
    if plan.total > headroom * free:
        raise MemoryPlanError(
            f"training needs about {format_bytes(plan.total)} on {device} but only {format_bytes(free)} of "
            f"{format_bytes(total)} is free ({plan.summary()}). Lower train.batch_size (raise "
            "train.grad_accum_steps to keep the effective batch), set train.mixed_precision: bf16, "
            "train.peft (LoRA), or train.policy.gradient_checkpointing where the policy has it"
        )
