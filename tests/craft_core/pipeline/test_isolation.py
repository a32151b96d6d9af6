"""Running a stage in its own (spawned) process: result, progress relay, errors and hard deaths."""

import os
import signal

import pytest

from craft_core.devices import uses_cuda
from craft_core.pipeline.isolation import StageProcessError, call_stage


def counting_stage(n: int, progress=None) -> dict:
    for i in range(1, n + 1):
        if progress:
            progress(i, n, {"pid": os.getpid()})
    return {"n": n, "pid": os.getpid()}


def failing_stage(progress=None) -> dict:
    raise ValueError("bad anchor store: rebuild it")


def dying_stage(progress=None) -> dict:
    os.kill(os.getpid(), signal.SIGKILL)


def test_inline_and_isolated_give_the_same_result_and_progress():
    seen_inline, seen_child = [], []
    inline = call_stage(counting_stage, {"n": 3}, isolate=False,
                        progress=lambda d, t, m: seen_inline.append((d, t, m["pid"])))
    child = call_stage(counting_stage, {"n": 3}, isolate=True,
                       progress=lambda d, t, m: seen_child.append((d, t, m["pid"])))
    assert inline["pid"] == os.getpid() and child["pid"] != os.getpid()
    assert [(d, t) for d, t, _ in seen_child] == [(1, 3), (2, 3), (3, 3)] == [(d, t) for d, t, _ in seen_inline]
    assert {pid for *_, pid in seen_child} == {child["pid"]}


def test_isolated_failure_carries_the_child_traceback():
    with pytest.raises(StageProcessError, match="bad anchor store: rebuild it") as info:
        call_stage(failing_stage, {}, isolate=True)
    assert "failing_stage" in str(info.value)


def test_isolated_hard_death_is_an_error_not_a_hang():
    with pytest.raises(StageProcessError, match="exited with code -9"):
        call_stage(dying_stage, {}, isolate=True)


def test_uses_cuda():
    assert uses_cuda("cuda:0") and not uses_cuda("cpu")
    assert uses_cuda("auto") is False  # tests hide the GPU (CUDA_VISIBLE_DEVICES="")
