"""How much memory a training run needs, before it starts.

``plan_memory(policy, batch_size=..., precision=..., peft=..., retention=...)`` adds up, in bytes:

- ``weights``: every parameter and buffer as it sits in the model (accelerate's mixed precision
  keeps float32 master weights; autocast only changes the compute dtype), plus LoRA adapter
  weights when ``peft`` asks for adapters the policy does not carry yet;
- ``gradients``: one ``.grad`` per trainable parameter (adapter parameters only under PEFT);
- ``optimizer``: AdamW's two moments per trainable parameter (lerobot's presets are AdamW), plus on
  CUDA one trainable-sized intermediate of its multi-tensor step;
- ``retention_buffer``: CRaFT's one gradient-sized retention buffer (``craft_core.surgery`` keeps
  no other copy) when retention is on, else 0;
- ``activations``: the peak memory of one training forward + backward of the (micro-)batch above
  the weights and gradients: what autograd saves for backward plus the transients (logits, the
  gradients of activations, autocast's low-precision weight copies). Measured when a sample
  ``batch`` is given: the step is run on 1 and on 8 samples of it (fewer if the batch is smaller) under the run's autocast, its
  peak recorded (the CUDA allocator's peak on GPU; elsewhere the larger of a dispatch-level
  tracker of every tensor storage and, on Linux, the growth of the process's peak resident memory,
  which also sees the allocator's and math libraries' overhead), and the line through the two points extended to
  ``batch_size`` (a fixed part, such as weight copies, does not scale with the batch). With
  retention on and ``anchor_batch_size`` larger than the batch, the line is extended to the anchor
  batch instead (the retention step's forward + backward never overlaps the task step's, so the
  larger of the two sizes bounds both). Without a batch it is
  estimated from the Linear layers: each saves its input, ``tokens_per_sample`` × ``in_features``
  activations per sample, doubled for norms, nonlinearities and attention.

``total`` is the sum: an upper bound on the peak (the optimizer's moments are allocated at its
first step, after the activations are gone, but they stay for the run).
"""

from __future__ import annotations

import ctypes
import gc
import re
import weakref
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from craft_core.devices import autocast_context

__all__ = ["MemoryPlan", "MemoryPlanError", "check_fits_device", "format_bytes", "plan_memory"]

_LOW_PRECISION = {"bf16": 2, "fp16": 2}
_ADAMW_MOMENTS = 2
# Each Linear saves its input for backward; norms, nonlinearities, residual adds and attention
# probabilities keep about as much again (measured on the tiny policies against the probe).
_ACTIVATION_FACTOR = 2.0
# The larger of the two activation probes (samples); see plan_memory.
_PROBE_SAMPLES = 8


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


class _LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created while active and still alive (CPU or any device).

    Storages that existed before (weights, gradients, the batch) are not counted. A storage is
    counted when an op first returns it and released when Python frees it (a weak reference).
    """

    def __init__(self, existing: Iterable[torch.Tensor]):
        super().__init__()
        self.live = self.peak = 0
        self._owned: dict[int, weakref.ref | None] = {t.untyped_storage().data_ptr(): None for t in existing}

    def _release(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._owned.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._owned:
                continue
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            self._owned[key] = weakref.ref(storage, lambda _, key=key, nbytes=nbytes: self._release(key, nbytes))
        return out


def _autocast(device: torch.device, precision: str):
    """The autocast of ``train.mixed_precision`` (``no``/``bf16``/``fp16``), as accelerate applies it."""
    return autocast_context(device.type, {"bf16": "bfloat16", "fp16": "float16"}.get(precision))


def process_memory_bytes(field: str) -> int:
    """A memory field of this process from ``/proc/self/status`` in bytes (``VmRSS`` resident now,
    ``VmHWM`` its peak); Linux only (OSError elsewhere)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def reset_peak_resident() -> None:
    """Reset the kernel's peak-resident counter (``VmHWM``) to the current resident size (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")


class _ResidentGrowth:
    """Growth of the process's peak resident memory over a block, on Linux (0 elsewhere).

    On CPU the tensors' own bytes are not all a step costs: the allocator's fragmentation and the
    math libraries' scratch and kernel caches (oneDNN keeps one per shape) add ~20-50 % on the tiny
    policies. Freed heap pages are returned first (``malloc_trim``) and the kernel's high-water
    mark reset, so the growth is what the block itself touched.
    """

    bytes = 0

    def __enter__(self):
        self._start = None
        try:
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            reset_peak_resident()
            self._start = process_memory_bytes("VmRSS")
        except (OSError, AttributeError):  # not Linux/glibc: the tensor tracker alone
            pass
        return self

    def __exit__(self, *exc):
        if self._start is not None:
            self.bytes = max(process_memory_bytes("VmHWM") - self._start, 0)
        return False


def measure_step_peak(policy: torch.nn.Module, batch: dict, *, precision: str = "no") -> int:
    """Peak bytes, above weights and gradients, of one forward + backward of ``policy(batch)`` (the
    policy's training loss) under the autocast ``precision`` names.

    Gradients of the trainable parameters are allocated before the step, so the peak counts only
    what the step adds to them. Leaves no gradient behind (they are None afterwards).
    """
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    existing = [*policy.parameters(), *policy.buffers(), *(p.grad for p in params),
                *(v for v in tree_flatten(batch)[0] if isinstance(v, torch.Tensor))]
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            with _autocast(device, precision):
                loss, _ = policy(batch)
            loss.backward()
            del loss
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) - before
        with _ResidentGrowth() as resident, _LiveTensorBytes(existing) as tracker:
            with _autocast(device, precision):
                loss, _ = policy(batch)
            loss.backward()
            del loss
        return max(tracker.peak, resident.bytes)
    finally:
        policy.train(was_training)
        for p in params:
            p.grad = None


def _batch_of(batch: dict, size: int) -> dict:
    """The first ``size`` samples of a collated batch, repeating its samples if it holds fewer."""
    n = _batch_size_of(batch)
    index = torch.arange(size) % n

    def take(value):
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            return value[index.to(value.device)]
        if isinstance(value, (list, tuple)) and len(value) == n:
            return type(value)(value[i] for i in index.tolist())
        return value

    return {key: take(value) for key, value in batch.items()}


def measure_activations(policy: torch.nn.Module, batch: dict, *, precision: str = "no",
                        largest: int = 8) -> tuple[int, int, tuple[int, int]]:
    """``(fixed, per_sample, sizes)``: a training step's peak above weights and gradients as a fixed
    part plus a per-sample part, from the step measured on 1 and on ``largest`` samples of ``batch``
    (see the module doc)."""
    sizes = (1, max(1, largest))
    if next(policy.parameters()).device.type == "cuda":
        low, high = (measure_step_peak(policy, _batch_of(batch, size), precision=precision) for size in sizes)
        once = 0
    else:
        # Off CUDA the first step at a new shape also allocates what the math libraries keep per
        # shape (kernel caches, scratch; ~16 MiB for tiny pi0_fast under bf16 autocast). It stays
        # resident but does not grow with the batch: each size runs twice, the second steps give
        # the line and the larger size's first-step excess is added once (the very first step,
        # at 1 sample, also pays the process's own lazy start-up, which training paid before).
        first, second = {}, {}
        for size in sizes:
            first[size] = measure_step_peak(policy, _batch_of(batch, size), precision=precision)
            second[size] = measure_step_peak(policy, _batch_of(batch, size), precision=precision)
        low, high = second[sizes[0]], second[sizes[1]]
        once = max(first[sizes[1]] - second[sizes[1]], 0) if sizes[1] != sizes[0] else 0
    if sizes[1] == 1:
        return once, low, sizes
    per_sample = (high - low) / (sizes[1] - 1)
    if per_sample <= 0:  # a non-increasing pair: no fixed part, the larger probe scaled
        return once, high / sizes[1], sizes
    return once + max(int(low - per_sample), 0), int(per_sample), sizes


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
                anchor_batch_size: int | None = None, optimizer_moments: int = _ADAMW_MOMENTS,
                device: torch.device | str | None = None) -> MemoryPlan:
    """The memory plan of training ``policy`` (see the module doc).

    ``precision``: ``no``/``bf16``/``fp16`` (train.mixed_precision). ``peft``: None, or the PEFT
    settings (``rank``/``r``, ``target_modules``; None targets = the policy's lerobot defaults); a
    policy already wrapped with adapters is planned as it is. ``retention``: CRaFT on. ``batch``: a
    preprocessed sample batch to measure activations with (preferred); else ``tokens_per_sample``
    drives the estimate. ``batch_size`` is the micro-batch one forward sees (per process);
    ``anchor_batch_size`` the retention step's (default: ``batch_size``). ``device``: where training
    runs (default: where the parameters are); planning a CUDA run from a model on the ``meta`` device
    (no memory) gives ``device="cuda"``.
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
    device = torch.device(device) if device is not None else (params[0].device if params else torch.device("cpu"))
    if device.type == "cuda":
        # On CUDA torch's AdamW runs its multi-tensor (foreach) kernels, whose intermediates are
        # one more trainable-sized buffer during the step.
        optimizer += trainable * param_bytes
        notes["optimizer"] = f"{optimizer_moments} AdamW moments + the foreach step's intermediate"
    retention_buffer = gradients if retention else 0
    if batch is not None:
        samples = max([batch_size, anchor_batch_size or batch_size] if retention else [batch_size])
        # Probes never exceed the run's own micro-batch: a probe must not fail where training fits.
        # 8 samples, not fewer: on CPU each peak is known to ~0.3 MiB (allocator pages), and the
        # slope's error is that over the probes' distance, multiplied out to the batch (1 and 4
        # samples put the tiny policies' plans 0.71-1.46x the measured peak from run to run).
        fixed, per_sample, probes = measure_activations(policy, batch, precision=precision,
                                                        largest=min(_PROBE_SAMPLES, samples))
        activations = int(fixed + per_sample * samples)
        notes["activations"] = (f"training step measured on {probes[0]} and {probes[1]} samples: "
                                f"{format_bytes(fixed)} fixed + {format_bytes(per_sample)} per sample, "
                                f"for {samples} samples")
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
