"""Run a craft_core stage function inline or in a fresh process (so its GPU memory is returned).

A CUDA context and the caching allocator keep memory until the process exits; running each GPU
stage in a ``spawn``-ed child is the only reliable way to hand all of it back between stages.
The child sends progress and the result (or the formatted traceback) back over a queue; the
parent keeps calling the progress callback, so Prefect artifacts update the same way in both
modes. No Prefect import here: the child only needs craft_core.
"""

import importlib
import inspect
import multiprocessing
import queue
import traceback
from typing import Any, Callable

Progress = Callable[[int, int, dict], None]


class StageProcessError(RuntimeError):
    """The stage failed inside its own process; the message carries the child's traceback."""


def resolve_function(path: str) -> Callable:
    module_name, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


def uses_cuda(device: str) -> bool:
    if device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    import torch

    return torch.cuda.is_available()


def _call(fn: Callable, kwargs: dict, progress: Progress | None) -> Any:
    if "progress" in inspect.signature(fn).parameters:
        return fn(**kwargs, progress=progress)
    return fn(**kwargs)


def _child(function_path: str, kwargs: dict, messages) -> None:
    def progress(done: int, total: int, metrics: dict) -> None:
        messages.put(("progress", (done, total, dict(metrics))))

    try:
        result = _call(resolve_function(function_path), kwargs, progress)
    except BaseException:
        messages.put(("error", traceback.format_exc()))
        raise SystemExit(1)
    messages.put(("result", result))


def call_stage(function_path: str, kwargs: dict, *, isolate: bool, progress: Progress | None = None) -> Any:
    """Call ``function_path(**kwargs, progress=...)``; in a spawned child when ``isolate``."""
    if not isolate:
        return _call(resolve_function(function_path), kwargs, progress)

    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    child = context.Process(target=_child, args=(function_path, kwargs, messages), name=f"craft-{function_path}")
    child.start()
    try:
        while True:
            try:
                kind, payload = messages.get(timeout=1.0)
            except queue.Empty:
                if not child.is_alive():
                    raise StageProcessError(
                        f"{function_path} process exited with code {child.exitcode} before returning a result "
                        "(killed, e.g. out of memory?)"
                    ) from None
                continue
            if kind == "progress":
                if progress is not None:
                    progress(*payload)
            elif kind == "error":
                raise StageProcessError(f"{function_path} failed in its own process:\n{payload}")
            else:
                return payload
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
            child.join()
