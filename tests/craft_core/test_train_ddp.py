"""Two CPU processes (gloo) make the same CRaFT update as one process on the union batch.

The processes are started by torchrun (what ``accelerate launch --multi_gpu`` runs; ``accelerate
launch --cpu`` needs MPI for several processes); with ``cpu=True`` accelerate's Accelerator turns
the torchrun environment into its MULTI_CPU mode with the gloo backend and wraps the policy in DDP.

Two retention steps (K=1; the first one's retention gradient is zero because the student starts as
an exact copy of the teacher) with batch 2 + anchor batch 2 per rank against one process with batch
4 + anchor batch 4: the task gradient is averaged by DDP, the retention gradient and L_ret by craft's
all-reduce, so weights, L_ret, λ and the gradient cosine must agree. The task dataset's actions are
constant, so every sample has the same number of FAST action tokens and pi0_fast's token-mean loss
over the union equals the mean of the two ranks' losses (what DDP averages).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from craft_core.config import PolicySource
from tests.craft_core.test_train import load_weights, make_anchor_store, read_metrics, retained_dataset, train_config

REPO_ROOT = Path(__file__).resolve().parents[2]

RUN_SCRIPT = """
import json, sys
import torch
torch.set_num_threads(1)
from craft_core.config import PolicySource, TrainConfig
from craft_core.train import train

args = json.loads(open(sys.argv[1]).read())
train(TrainConfig.model_validate(args["cfg"]), teacher=PolicySource(path=args["teacher"]), store_url=args["store"],
      out_dir=args["out"])
"""


def _write_constant_action_dataset(source_meta, root: Path) -> tuple[str, Path]:
    """A pusht-shaped dataset (the teacher's features) whose action is the same in every frame."""
    from lerobot.datasets import LeRobotDataset
    from lerobot.utils.constants import DEFAULT_FEATURES

    features = {k: v for k, v in source_meta.features.items() if k not in DEFAULT_FEATURES}
    repo_id = "local/pusht_constant_action"
    dataset = LeRobotDataset.create(repo_id, fps=source_meta.fps, features=features, root=root, use_videos=False)
    rng = np.random.default_rng(1)
    for episode in range(2):
        for _ in range(6):
            frame = {}
            for key, feature in features.items():
                if feature["dtype"] == "image":
                    frame[key] = rng.integers(0, 256, size=feature["shape"], dtype=np.uint8)
                elif key == "action":
                    frame[key] = np.full(feature["shape"], 0.25, dtype=np.float32)
                elif feature["dtype"] == "bool":
                    frame[key] = np.zeros(feature["shape"], dtype=bool)
                else:
                    frame[key] = rng.uniform(0, 1, size=feature["shape"]).astype(feature["dtype"])
            frame["task"] = f"constant action task {episode}"
            dataset.add_frame(frame)
        dataset.save_episode()
    dataset.finalize()
    return repo_id, root


def test_two_process_update_equals_one_process_on_the_union_batch(tiny_pi0_fast, pusht_datasets, tmp_path):
    from craft_core.train import train

    store = make_anchor_store(tiny_pi0_fast, *retained_dataset(pusht_datasets), tmp_path / "anchors.zarr", n_anchors=8)
    repo_id, root = _write_constant_action_dataset(pusht_datasets["push_t"]["meta"], tmp_path / "constant_action")
    retention = {"every_k": 1, "merge": "weighted", "conflict_threshold": 1.0}  # always project: exercise PCGrad
    two_cfg = train_config(repo_id, root, steps=2, batch_size=2, retention={**retention, "anchor_batch_size": 2})
    one_cfg = train_config(repo_id, root, steps=2, batch_size=4, retention={**retention, "anchor_batch_size": 4})

    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"cfg": two_cfg.model_dump(mode="json"), "teacher": str(tiny_pi0_fast),
                                     "store": store, "out": str(tmp_path / "two")}))
    script = tmp_path / "run_train.py"
    script.write_text(RUN_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(args_file)]
    # start_new_session + killpg on timeout: neither the launcher nor its workers can outlive the test.
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        raise
    assert proc.returncode == 0, output.decode()[-4000:]

    one = train(one_cfg, teacher=PolicySource(path=str(tiny_pi0_fast)), store_url=store, out_dir=tmp_path / "one")
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["num_processes"] == 2 and one["num_processes"] == 1

    m2, m1 = read_metrics(tmp_path / "two")[-1], read_metrics(tmp_path / "one")[-1]
    assert m1["retention_step"] and m2["retention_step"] and m1["projected"] and m2["projected"]
    for key in ("task_loss", "retention_loss", "grad_cosine", "grad_norm", "lambda/prefix", "lambda/action_output"):
        assert np.isclose(m2[key], m1[key], rtol=1e-4, atol=1e-7), (key, m2[key], m1[key])

    start = load_weights(tiny_pi0_fast)
    w1, w2 = load_weights(one["checkpoint"]), load_weights(two["checkpoint"])
    update_one = {k: w1[k] - start[k] for k in start}
    update_two = {k: w2[k] - start[k] for k in start}
    largest = max(u.abs().max().item() for u in update_one.values())
    assert largest > 1e-4  # a real update (lr 1e-3), not two untouched copies
    for k in start:
        torch.testing.assert_close(update_two[k], update_one[k], rtol=0, atol=2e-5, msg=lambda m: f"{k}: {m}")
