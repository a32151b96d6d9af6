"""The one resolver of device settings (``cache.device``, ``train.device``, ``eval.device``...).

``auto`` means CUDA when available, else CPU. An explicit CUDA device on a machine without CUDA is
refused with the config field named, before any stage touches a model. Also the one autocast
context: extraction, the retention forward, drift and the memory plan's probe all compute under it,
so the keystone invariant (a student copy reproduces the teacher's targets) holds under any precision.
"""

import contextlib

import torch


def resolve_device(requested: str, *, field: str = "device") -> torch.device:
    """``requested`` (``auto``, ``cpu``, ``cuda``, ``cuda:1``...) as a torch device available here."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise ValueError(f"{field}={requested!r} is not a device name ({exc}); use 'auto', 'cpu' or 'cuda[:N]'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{field}={requested!r} but CUDA is not available here; use 'cpu' or 'auto'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{field}={requested!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def uses_cuda(requested: str) -> bool:
    """Whether a device setting resolves to CUDA here (``auto`` on a GPU machine does)."""
    if requested.startswith("cuda"):
        return True
    return requested == "auto" and torch.cuda.is_available()


def autocast_context(device_type: str, dtype: str | None):
    """``torch.autocast`` on ``device_type`` to ``dtype`` (a torch dtype name, such as the store's
    ``compute.autocast`` "bfloat16"); a no-op for None. Applied on every device, CPU included: the
    teacher's targets were computed this way wherever they were computed."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=getattr(torch, dtype))
