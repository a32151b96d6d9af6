"""End-to-end eval stage: tiny real pi0_fast policies rolled out in gym-pusht / gym-aloha through
lerobot's eval_policy_all, drift measured on a real Zarr anchor store, reports written.

Seconds per episode are logged (not asserted): run with ``-s`` to see them.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from craft_core.config import EvalConfig, SimEvalConfig

pytestmark = pytest.mark.integration

FINETUNE_STEPS = 3
PUSHT_STEPS = 25  # per episode; pusht's own limit is 300
ALOHA_STEPS = 8  # gym-aloha renders 640x480 in software: ~0.2-2 s per step on 2 busy cores


def _frames(dataset: dict, policy, n: int) -> dict:
    """A collated batch of the first ``n`` frames, with the action chunk the policy trains on."""
    from lerobot.datasets.factory import resolve_delta_timestamps
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    delta_timestamps = resolve_delta_timestamps(policy.config, dataset["meta"])
    frames = LeRobotDataset(dataset["repo_id"], root=dataset["root"], delta_timestamps=delta_timestamps)
    return torch.utils.data.default_collate([frames[i] for i in range(n)])


def finetune_copy(teacher_dir: Path, dataset: dict, out_dir: Path) -> float:
    """A few AdamW steps of the policy's own loss on ``dataset``, saved as a pretrained_model folder."""
    from craft_core.policy_io import load_policy, make_processors, policy_loading_context

    shutil.copytree(teacher_dir, out_dir)  # processors, tokenizers and the tiny marker come along
    torch.manual_seed(0)
    with policy_loading_context(teacher_dir):
        student = load_policy(teacher_dir, trainable=True)
        preprocessor, _ = make_processors(student, pretrained_path=teacher_dir)
        batch = preprocessor(_frames(dataset, student, n=4))
        optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
        for _ in range(FINETUNE_STEPS):
            loss, _ = student.forward(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        student.save_pretrained(out_dir)
    return loss.item()


@pytest.fixture(scope="module")
def pusht_runs(tiny_pi0_fast, pusht_datasets, tmp_path_factory) -> dict:
    """The shared tiny teacher (built for task B, circle), a copy fine-tuned on task A (push_t) and a
    float32 anchor store of the teacher on task B with half of the anchors held out."""
    from craft_core.config import CacheConfig, DatasetSource, PolicySource
    from craft_core.extraction import extract_anchors

    root = tmp_path_factory.mktemp("eval_pusht")
    task_a, task_b = pusht_datasets["push_t"], pusht_datasets["circle"]
    final_loss = finetune_copy(tiny_pi0_fast, task_a, root / "finetuned")
    cache = CacheConfig(
        teacher=PolicySource(path=str(tiny_pi0_fast)),
        dataset=DatasetSource(repo_id=task_b["repo_id"], root=str(task_b["root"])),
        n_anchors=6,
        heldout_fraction=0.5,
        dtype="float32",
        batch_size=6,
        device="cpu",
    )
    store = extract_anchors(cache, str(root / "anchors.zarr"))
    return {"teacher": tiny_pi0_fast, "finetuned": root / "finetuned", "final_loss": final_loss, "store": store}


def test_pusht_teacher_vs_finetuned_report(pusht_runs, tmp_path):
    from craft_core.config import PolicySource
    from craft_core.evaluation import comparison_rows, evaluate

    cfg = EvalConfig(
        sim=[SimEvalConfig(env="pusht", n_episodes=2, max_episode_steps=PUSHT_STEPS, seed=7, n_videos=1)],
        drift=True,
        drift_batch_size=2,
        device="cpu",
    )
    fingerprints = {"cache": "c0ffee", "train": "beef42"}
    progress_calls = []
    report = evaluate(
        cfg,
        runs={"teacher": str(pusht_runs["teacher"]), "finetuned": str(pusht_runs["finetuned"])},
        teacher=PolicySource(path=str(pusht_runs["teacher"])),
        store_url=pusht_runs["store"]["store_url"],
        out_dir=tmp_path,
        train_results={"finetuned": {"final_task_loss": pusht_runs["final_loss"], "steps": FINETUNE_STEPS}},
        fingerprints=fingerprints,
        progress=lambda done, total, metrics: progress_calls.append((done, total, metrics)),
    )

    assert json.loads((tmp_path / "report.json").read_text()) == report
    # One call per (run, sim env) and per (run, drift).
    assert [(done, total) for done, total, _ in progress_calls] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert progress_calls[-1][2] == {"run": "finetuned", "drift_mse": report["drift"]["finetuned"]["mse"]}
    assert report["fingerprints"] == fingerprints
    for run in ("teacher", "finetuned"):
        sim = report["sim"][run]["pusht"]
        episodes = sim["episodes"]
        assert [e["seed"] for e in episodes] == [7, 8]
        assert sim["n_episodes"] == 2 and sim["episode_length"] == PUSHT_STEPS
        assert sim["success_rate"] == pytest.approx(np.mean([e["success"] for e in episodes]))
        assert sim["avg_sum_reward"] == pytest.approx(np.mean([e["sum_reward"] for e in episodes]))
        assert sim["avg_max_reward"] == pytest.approx(np.mean([e["max_reward"] for e in episodes]))
        for e in episodes:
            # pusht's reward is the block's goal coverage in [0, 1] per step.
            assert 0.0 <= e["max_reward"] <= 1.0 and e["sum_reward"] <= PUSHT_STEPS * e["max_reward"] + 1e-9
        assert len(sim["videos"]) == 1
        video = tmp_path / sim["videos"][0]
        assert video.suffix == ".mp4" and video.stat().st_size > 0
        print(f"pusht {run}: {sim['s_per_episode']:.2f} s per {PUSHT_STEPS}-step episode")

    held_out = pusht_runs["store"]["n_heldout"]
    teacher_drift, finetuned_drift = report["drift"]["teacher"], report["drift"]["finetuned"]
    assert teacher_drift["n_anchors"] == finetuned_drift["n_anchors"] == held_out
    assert len(teacher_drift["per_vector"]) == 2 * 2  # layers x pooled vectors
    # The stored vectors were computed from the stored inputs in float32: the teacher reproduces them.
    assert teacher_drift["mse"] <= 1e-10 and teacher_drift["cosine"] <= 1e-10
    assert all(v["mse"] <= 1e-10 for v in teacher_drift["per_vector"])
    assert finetuned_drift["mse"] > 1e-6 and finetuned_drift["cosine"] > 1e-6
    assert max(v["mse"] for v in finetuned_drift["per_vector"]) > 1e-6

    rows = {row["run"]: row for row in comparison_rows(report)}
    assert rows["finetuned"]["final task loss"] == pytest.approx(pusht_runs["final_loss"])
    assert rows["teacher"]["final task loss"] is None
    assert rows["finetuned"]["drift mse"] == finetuned_drift["mse"]
    assert rows["teacher"]["pusht success %"] == 100 * report["sim"]["teacher"]["pusht"]["success_rate"]

    markdown = (tmp_path / "report.md").read_text()
    assert "| run | pusht success % | pusht success 95% CI |" in markdown
    assert "c0ffee" in markdown and "beef42" in markdown
    comparison = markdown.split("## Comparison")[1].split("##")[0]
    assert [line.split("|")[1].strip() for line in [row for row in comparison.strip().splitlines() if row.startswith("|")][2:]] == ["teacher", "finetuned"]


@pytest.fixture(scope="module")
def aloha_teacher(aloha_dataset, tmp_path_factory) -> Path:
    from craft_core.demo.tiny import build_tiny_policy

    return build_tiny_policy(
        "pi0_fast", tmp_path_factory.mktemp("eval_aloha") / "teacher", ds_meta=aloha_dataset["meta"], seed=0
    )


def test_aloha_one_short_episode_report(aloha_teacher, tmp_path):
    from craft_core.evaluation import evaluate

    cfg = EvalConfig(
        sim=[SimEvalConfig(env="aloha", n_episodes=1, max_episode_steps=ALOHA_STEPS, n_videos=0)],
        drift=True,  # no store given: drift is skipped and the report says why
        device="cpu",
    )
    report = evaluate(cfg, runs={"teacher": str(aloha_teacher)}, teacher=None, store_url=None, out_dir=tmp_path)

    sim = report["sim"]["teacher"]["aloha"]
    assert sim["task"] == "AlohaInsertion-v0" and sim["episode_length"] == ALOHA_STEPS
    assert len(sim["episodes"]) == 1 and sim["episodes"][0]["seed"] == cfg.sim[0].seed
    assert sim["success_rate"] in (0.0, 1.0) and np.isfinite(sim["avg_sum_reward"])
    assert sim["videos"] == [] and not (tmp_path / "videos" / "teacher" / "aloha").exists()
    assert report["drift"] == {} and "no anchor store" in report["drift_skipped"]
    assert json.loads((tmp_path / "report.json").read_text())["sim"] == report["sim"]
    assert "aloha success %" in (tmp_path / "report.md").read_text()
    print(f"aloha: {sim['s_per_episode']:.2f} s per {ALOHA_STEPS}-step episode")


def test_store_of_another_policy_type_is_refused_before_any_rollout(pusht_runs, tmp_path):
    from craft_core.evaluation import evaluate

    other = tmp_path / "smolvla_run"
    shutil.copytree(pusht_runs["teacher"], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "type": "smolvla"}))
    cfg = EvalConfig(sim=[SimEvalConfig(env="pusht", max_episode_steps=2)], drift=True, device="cpu")
    with pytest.raises(ValueError, match=r"run 'other' is a smolvla policy but anchor store .* pi0_fast teacher"):
        evaluate(
            cfg,
            runs={"teacher": str(pusht_runs["teacher"]), "other": str(other)},
            teacher=None,
            store_url=pusht_runs["store"]["store_url"],
            out_dir=tmp_path / "eval",
        )
    assert not (tmp_path / "eval").exists()
