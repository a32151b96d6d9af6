"""Stage fingerprints, code versions and the completion protocol of stage directories."""

import json
import multiprocessing
import os
import signal
import time

import pytest

from craft_core.config import load_preset
from craft_core.pipeline.fingerprint import (
    MANIFEST,
    IncompleteStageError,
    StageDir,
    canonical_json,
    code_version,
    module_closure,
    run_stage,
    stage_fingerprint,
)


def test_fingerprint_is_stable_and_order_independent():
    a = stage_fingerprint("cache", {"x": 1, "y": [1, 2]}, {"assets": "aa", "z": "zz"}, "code1")
    b = stage_fingerprint("cache", {"y": [1, 2], "x": 1}, {"z": "zz", "assets": "aa"}, "code1")
    assert a == b and len(a) == 16


@pytest.mark.parametrize(
    "change",
    [
        dict(stage="train"),
        dict(config={"x": 2, "y": [1, 2]}),
        dict(config={"x": 1, "y": [2, 1]}),
        dict(upstream={"assets": "ab", "z": "zz"}),
        dict(code="code2"),
    ],
)
def test_fingerprint_changes_with_every_input(change):
    base = dict(stage="cache", config={"x": 1, "y": [1, 2]}, upstream={"assets": "aa", "z": "zz"}, code="code1")
    assert stage_fingerprint(**base) != stage_fingerprint(**{**base, **change})


def test_non_semantic_keys_do_not_change_the_fingerprint():
    cfg = load_preset("smoke")
    more_workers = load_preset("smoke", ["train.num_workers=4", "train.wandb_project=x"])
    assert canonical_json(cfg.train, "train") == canonical_json(more_workers.train, "train")
    other = load_preset("smoke", ["train.steps=5"])
    assert canonical_json(cfg.train, "train") != canonical_json(other.train, "train")


def test_code_version_follows_the_modules_a_stage_imports():
    train_paths = [str(p) for p in module_closure("craft_core.train")]
    train_files = {p.rsplit("/", 1)[1] for p in train_paths}
    assert {"train.py", "losses.py", "surgery.py", "dual.py", "reader.py", "adapter.py"} <= train_files
    assert "extraction.py" not in train_files  # editing extraction must not re-run training
    assert not any("/demo/" in p or p.endswith("/tiny.py") for p in train_paths)  # nor editing the demo
    assets_files = {str(p) for p in module_closure("craft_core.demo.assets")}
    assert any(p.endswith("tiny/build.py") for p in assets_files)
    # tiny builders are loaded by folder convention (importlib): they count for the assets stage
    assert any(p.endswith("policies/pi0_fast/tiny.py") for p in assets_files)
    assert code_version("craft_core.train") == code_version("craft_core.train")
    assert code_version("craft_core.train") != code_version("craft_core.demo.assets")
    with pytest.raises(ValueError, match="not a module"):
        code_version("craft_core.no_such_module")


def test_run_stage_commits_once_and_then_reuses(tmp_path):
    stage_dir = StageDir(tmp_path, "cache", "f" * 16)
    calls = []

    def work(out_dir):
        calls.append(out_dir)
        (out_dir / "data.txt").write_text("hello")
        return {"n": 3, "file": str(out_dir / "data.txt")}

    result, executed = run_stage(stage_dir, work, config={"a": 1}, upstream={"assets": "x"}, code="c")
    assert executed and result["n"] == 3
    manifest = json.loads((stage_dir.path / MANIFEST).read_text())
    assert manifest["complete"] is True and manifest["fingerprint"] == "f" * 16
    assert manifest["upstream"] == {"assets": "x"} and manifest["config"] == {"a": 1}

    result2, executed2 = run_stage(stage_dir, work)
    assert not executed2 and result2 == result and len(calls) == 1


def test_failed_stage_leaves_nothing_complete_and_resumes_in_place(tmp_path):
    stage_dir = StageDir(tmp_path, "train", "0123456789abcdef")

    def crash(out_dir):
        (out_dir / "checkpoint-1").write_text("partial")
        raise RuntimeError("killed mid-stage")

    with pytest.raises(RuntimeError, match="killed"):
        run_stage(stage_dir, crash)
    assert not stage_dir.is_complete()
    with pytest.raises(IncompleteStageError, match="no complete output"):
        stage_dir.result()

    seen = {}

    def resume(out_dir):
        seen["partial"] = (out_dir / "checkpoint-1").read_text()  # the partial work is still there
        return {"resumed": True}

    result, executed = run_stage(stage_dir, resume)
    assert executed and result == {"resumed": True} and seen["partial"] == "partial"
    assert stage_dir.is_complete()


def test_foreign_or_corrupt_manifest_is_not_complete(tmp_path):
    stage_dir = StageDir(tmp_path, "eval", "a" * 16)
    stage_dir.path.mkdir(parents=True)
    (stage_dir.path / MANIFEST).write_text("{not json")
    assert not stage_dir.is_complete()
    other = {"complete": True, "stage": "eval", "fingerprint": "b" * 16, "result": {}}
    (stage_dir.path / MANIFEST).write_text(json.dumps(other))
    assert not stage_dir.is_complete()


def _killed_worker(root, started):
    def work(out_dir):
        (out_dir / "half").write_text("x")
        started.set()
        time.sleep(60)
        return {}

    run_stage(StageDir(root, "cache", "c" * 16), work)


def test_killed_process_leaves_an_incomplete_dir(tmp_path):
    """A SIGKILL (OOM, pre-emption) mid-stage: the directory exists but never looks complete."""
    context = multiprocessing.get_context("spawn")
    started = context.Event()
    child = context.Process(target=_killed_worker, args=(str(tmp_path), started))
    child.start()
    assert started.wait(60)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    stage_dir = StageDir(tmp_path, "cache", "c" * 16)
    assert (stage_dir.path / "half").exists()
    assert not stage_dir.is_complete()
    # and the lock died with the process: a new run can take over
    result, executed = run_stage(stage_dir, lambda out_dir: {"ok": 1})
    assert executed and result == {"ok": 1}


def test_code_version_ignores_comments_and_docstrings_but_not_code(tmp_path, monkeypatch):
    import craft_core.pipeline.fingerprint as fp

    package = tmp_path / "craft_core"
    package.mkdir()
    (package / "__init__.py").write_text("")
    stage = package / "stage.py"
    stage.write_text('"""Doc."""\nimport craft_core.helper\n\ndef f():\n    return 1\n')
    (package / "helper.py").write_text("X = 1\n")
    monkeypatch.setattr(fp, "PACKAGE_ROOT", package)
    base = fp.code_version("craft_core.stage")

    stage.write_text('"""Other doc."""\nimport craft_core.helper  # why\n\n\ndef f():\n    """Doc."""\n    return 1\n')
    assert fp.code_version("craft_core.stage") == base
    (package / "helper.py").write_text("X = 20\n")  # an imported module's code changed
    assert fp.code_version("craft_core.stage") != base
