"""Offline demo assets: two scripted sim datasets and a tiny real lerobot teacher that knows task A.

The retention experiment needs a teacher that already *does* something (task A), a new task to
fine-tune on (task B), and anchors taken from task A. Without the hub, all three are built here:

    datasets/task_a, datasets/task_b   scripted gym recordings (craft_core.demo.sim_datasets): the
                                       training episodes, then the held-out ones (never trained on
                                       or anchored: configs select episodes by index)
    teacher_init/                      tiny real policy for the datasets' features (craft_core.demo.tiny),
                                       normalised with task A's statistics or, with teacher_stats
                                       both_tasks, lerobot's aggregate of both recordings' statistics
    teacher_pretrain/                  the ordinary training loop on task A, retention off
    teacher/                           the teacher the pipeline uses (pretrained, or the init copy)

Every step is restartable: recordings are seeded and re-recorded, the tiny build is rebuilt from
its seed, and pretraining resumes from its last checkpoint, so the assets stage can be rerun
after a crash in the same (incomplete) directory.
"""

import copy
import shutil
from pathlib import Path
from typing import Callable

from craft_core.config import AssetsConfig, DatasetSource, PolicySource, TrainConfig

Progress = Callable[[int, int, dict], None]

TASK_KEYS = ("task_a", "task_b")


def dataset_repo_id(cfg: AssetsConfig, task: str) -> str:
    return f"craft_demo/{cfg.env}_{task}"


def pretrain_config(cfg: AssetsConfig, dataset: DatasetSource) -> TrainConfig:
    """Plain (retention-off) training of the tiny teacher on task A."""
    return TrainConfig(
        dataset=dataset,
        steps=cfg.teacher_pretrain_steps,
        batch_size=cfg.teacher_pretrain_batch_size,
        lr=cfg.teacher_pretrain_lr,
        seed=cfg.seed,
        device=cfg.device,
        save_every=max(1, cfg.teacher_pretrain_steps),
        log_every=max(1, min(10, cfg.teacher_pretrain_steps)),
        retention=None,
    )


def build_demo_assets(cfg: AssetsConfig, out_dir: str | Path, progress: Progress | None = None) -> dict:
    """Build the demo's datasets and teacher under ``out_dir``; returns their locations."""
    from craft_core.demo.sim_datasets import record_dataset
    from craft_core.demo.tiny import TINY_MARKER, build_tiny_policy, copy_tiny_marker

    out_dir = Path(out_dir).absolute()
    total = len(TASK_KEYS) + 1 + cfg.teacher_pretrain_steps
    train_episodes = list(range(cfg.episodes_per_task))
    heldout_episodes = list(range(cfg.episodes_per_task, cfg.episodes_per_task + cfg.heldout_episodes_per_task))
    done = 0

    def report(metrics: dict) -> None:
        if progress is not None:
            progress(done, total, metrics)

    datasets: dict[str, dict] = {}
    metas = {}
    for key, task in zip(TASK_KEYS, (cfg.task_a, cfg.task_b)):
        root = out_dir / "datasets" / key
        repo_id = dataset_repo_id(cfg, task)
        metas[key] = record_dataset(
            cfg.env,
            task,
            repo_id=repo_id,
            root=root,
            n_episodes=cfg.episodes_per_task + cfg.heldout_episodes_per_task,
            max_steps=cfg.max_episode_steps,
            image_size=cfg.image_size,
            seed=cfg.seed + (0 if key == "task_a" else 1),
            overwrite=True,  # a half-written recording from a killed run is simply redone
        )
        datasets[key] = {"repo_id": repo_id, "root": str(root), "task": task, "frames": metas[key].total_frames,
                         "train_episodes": train_episodes, "heldout_episodes": heldout_episodes}
        done += 1
        report({"recorded": key, "frames": metas[key].total_frames})

    teacher_init = out_dir / "teacher_init"
    shutil.rmtree(teacher_init, ignore_errors=True)
    teacher_meta = metas["task_a"]
    if cfg.teacher_stats == "both_tasks":
        from lerobot.datasets.compute_stats import aggregate_stats

        # The same aggregate train.normalization=union computes, so teacher and union coincide.
        teacher_meta = copy.copy(teacher_meta)
        teacher_meta.stats = aggregate_stats([metas["task_a"].stats, metas["task_b"].stats])
    build_tiny_policy(cfg.policy_type, teacher_init, ds_meta=teacher_meta, seed=cfg.seed)
    done += 1
    report({"built": cfg.policy_type})

    teacher = out_dir / "teacher"
    result: dict = {"teacher": str(teacher), "teacher_init": str(teacher_init), "datasets": datasets,
                    "policy_type": cfg.policy_type}
    if cfg.teacher_pretrain_steps > 0:
        from craft_core.train import train

        base = done

        def pretrain_progress(step: int, steps: int, metrics: dict) -> None:
            nonlocal done
            done = base + step
            report({"pretrain_" + k: v for k, v in metrics.items()})

        dataset_a = DatasetSource(repo_id=datasets["task_a"]["repo_id"], root=datasets["task_a"]["root"],
                                  episodes=train_episodes if cfg.heldout_episodes_per_task else None)
        pretrained = train(
            pretrain_config(cfg, dataset_a),
            teacher=PolicySource(path=str(teacher_init)),
            store_url=None,
            out_dir=out_dir / "teacher_pretrain",
            progress=pretrain_progress,
            role="teacher pretraining",
        )
        source = Path(pretrained["checkpoint"])
        result["pretrain"] = {
            "steps": pretrained.get("steps"),
            "final_task_loss": pretrained.get("final_task_loss"),
            "plot": pretrained.get("plot"),
            "metrics": pretrained.get("metrics"),
        }
    else:
        source = teacher_init
    shutil.rmtree(teacher, ignore_errors=True)
    shutil.copytree(source, teacher, symlinks=False)
    if not (teacher / TINY_MARKER).exists():  # the marker is what makes policy_io load it tiny
        copy_tiny_marker(teacher_init, teacher)
    done = total
    report({"teacher": str(teacher)})
    return result


def assets_stage(cfg: AssetsConfig, *, upstream: dict[str, dict], out_dir: Path, progress: Progress | None = None) -> dict:
    """The pipeline's assets stage (offline demo only): recordings and the tiny teacher in ``out_dir``."""
    return build_demo_assets(cfg, out_dir, progress=progress)
