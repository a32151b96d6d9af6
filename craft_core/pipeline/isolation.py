"""Run a stage function inline or in a fresh process (so its GPU memory is returned).

A CUDA context and the caching allocator keep memory until the process exits; running each GPU
stage in a ``spawn``-ed child is the only reliable way to hand all of it back between stages.
The child sends progress and the result (or the formatted traceback) back over a queue; the
parent keeps calling the progress callback, so Prefect artifacts update the same way in both
modes. The function travels to the child by reference (pickled by its qualified name), so it
must be a module-level function.
"""

import inspect
import multiprocessing
import queue
import traceback
from typing import Any, Callable

Progress = Callable[[int, int, dict], None]


class StageProcessError(RuntimeError):
    """The stage failed inside its own process; the message carries the child's traceback.
    ``input_error``: the child died of an input/config error (see ``preflight.is_input_error``)."""

    def __init__(self, message: str, *, input_error: bool = False):
        super().__init__(message)
        self.input_error = input_error


def _call(fn: Callable, kwargs: dict, progress: Progress | None) -> Any:
    if "progress" in inspect.signature(fn).parameters:
        return fn(**kwargs, progress=progress)
    return fn(**kwargs)


def _child(fn: Callable, kwargs: dict, messages) -> None:
    def progress(done: int, total: int, metrics: dict) -> None:
        messages.put(("progress", (done, total, dict(metrics))))

    try:
        result = _call(fn, kwargs, progress)
    except BaseException as exc:
        from craft_core.pipeline.preflight import is_input_error

        messages.put(("error", (traceback.format_exc(), is_input_error(exc))))
        raise SystemExit(1)
    messages.put(("result", result))


def call_stage(fn: Callable, kwargs: dict, *, isolate: bool, progress: Progress | None = None) -> Any:
    """Call ``fn(**kwargs, progress=...)``; in a spawned child when ``isolate``."""
    if not isolate:
        return _call(fn, kwargs, progress)
    name = f"{fn.__module__}.{fn.__qualname__}"

    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    child = context.Process(target=_child, args=(fn, kwargs, messages), name=f"craft-{name}")
    child.start()
    try:
        while True:
            try:
                kind, payload = messages.get(timeout=1.0)
            except queue.Empty:
                if not child.is_alive():
                    raise StageProcessError(
                        f"{name} process exited with code {child.exitcode} before returning a result "
                        "(killed, e.g. out of memory?)"
                    ) from None
                continue
            if kind == "progress":
                if progress is not None:
                    progress(*payload)
            elif kind == "error":
                text, input_error = payload
                raise StageProcessError(f"{name} failed in its own process:\n{text}", input_error=input_error)
            else:
                return payload
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
            child.join()
