"""A CRaFT run killed with SIGKILL resumes from its last checkpoint to the same final weights.

smolvla is used on purpose: its flow-matching loss draws noise and times from the global RNG, so
the weights only match bit for bit if the RNG states, the data position, the anchor position, the
optimizer/scheduler states and λ are all restored.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from craft_core.config import PolicySource
from tests.craft_core.test_train import (
    load_weights,
    make_anchor_store,
    read_metrics,
    retained_dataset,
    task_dataset,
    train_config,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

RUN_SCRIPT = """
import json, sys, time
import torch
torch.set_num_threads(1)
from craft_core.config import PolicySource, TrainConfig
from craft_core.train import train

args = json.loads(sys.argv[1])
cfg = TrainConfig.model_validate(args["cfg"])
# Slows each step down (after its metrics are logged) so the test can kill the run mid-way.
slow = lambda done, total, metrics: time.sleep(args["step_delay_s"])
train(cfg, teacher=PolicySource(path=args["teacher"]), store_url=args["store"], out_dir=args["out"], progress=slow)
"""


def _train_single_thread(cfg, **kwargs):
    from craft_core.train import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the killed run ran single-threaded too: same kernels, same rounding
    try:
        return train(cfg, **kwargs)
    finally:
        torch.set_num_threads(threads)


def _kill_after_checkpoint(args: dict, out_dir: Path, timeout_s: float = 240.0) -> int:
    """Start the run in a subprocess, SIGKILL it once a checkpoint exists; return its last checkpoint step."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", RUN_SCRIPT, json.dumps(args)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = out_dir / "checkpoints" / "last"
    deadline = time.monotonic() + timeout_s
    try:
        while not last.is_symlink():
            if proc.poll() is not None:
                raise AssertionError(f"training subprocess ended (rc {proc.returncode}) before its first "
                                     f"checkpoint:\n{proc.stderr.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("no checkpoint appeared in time")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return int(last.resolve().name)


def test_sigkilled_run_resumes_to_the_same_weights(tiny_smolvla, pusht_datasets, tmp_path):
    from craft_core.checkpoint import ResumeConfigMismatch

    store = make_anchor_store(tiny_smolvla, *retained_dataset(pusht_datasets), tmp_path / "anchors.zarr")
    repo_id, root = task_dataset(pusht_datasets)
    cfg = train_config(repo_id, root, steps=6, save_every=2)
    teacher = PolicySource(path=str(tiny_smolvla))

    reference = _train_single_thread(cfg, teacher=teacher, store_url=store, out_dir=tmp_path / "uninterrupted")

    out_dir = tmp_path / "killed"
    args = {"cfg": cfg.model_dump(mode="json"), "teacher": str(tiny_smolvla), "store": store,
            "out": str(out_dir), "step_delay_s": 0.5}
    killed_at = _kill_after_checkpoint(args, out_dir)
    assert killed_at in (2, 4)
    assert not (out_dir / "result.json").exists()

    resumed = _train_single_thread(cfg, teacher=teacher, store_url=store, out_dir=out_dir)
    assert resumed["steps"] == 6

    final, expected = load_weights(resumed["checkpoint"]), load_weights(reference["checkpoint"])
    assert final.keys() == expected.keys()
    mismatched = [k for k in expected if not torch.equal(final[k], expected[k])]
    assert not mismatched, f"{len(mismatched)} tensors differ after resume, e.g. {mismatched[:3]}"
    assert any(not torch.equal(final[k], w) for k, w in load_weights(tiny_smolvla).items())
    assert resumed["final_lambda"] == reference["final_lambda"]

    # metrics.jsonl has each step once: the steps after the checkpoint were logged again, not twice.
    records = read_metrics(out_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["task_loss"] for r in records] == [r["task_loss"] for r in read_metrics(tmp_path / "uninterrupted")]

    # Resuming with another configuration is refused, naming what changed.
    with pytest.raises(ResumeConfigMismatch, match=r"config\.lr"):
        _train_single_thread(cfg.model_copy(update={"lr": 5e-4}), teacher=teacher, store_url=store,
                             out_dir=out_dir)
