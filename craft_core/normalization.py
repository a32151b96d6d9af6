"""Which statistics a fine-tuned student normalises with: ``train.normalization``.

A checkpoint is deployed with its one saved pipeline, so the statistics fine-tuning saves decide
whether that checkpoint still serves the task it was meant to retain:

- ``task``: the new task's dataset statistics (what ``lerobot-train`` does when fine-tuning on a new
  dataset). The saved pipeline then normalises the retained task's observations and actions on the
  new task's scale, so a retained policy is deployed on foreign statistics.
- ``teacher``: the teacher's own saved statistics, unchanged. The new task is learnt on the
  teacher's scale; the retained task is served exactly as the teacher served it.
- ``union``: statistics aggregated over the anchor dataset and the new task's dataset (lerobot's
  ``aggregate_stats``): one scale covering both.

The anchor store is made with the same statistics (``craft_core.extraction``): its stored inputs
are what the fine-tuned checkpoint's own pipeline makes of the anchor frames, so the retention
constraint speaks about the deployed student.
"""

from typing import Literal

from craft_core.config import DatasetSource

NormalizationMode = Literal["task", "teacher", "union"]


def dataset_stats(source: DatasetSource) -> dict:
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    return LeRobotDatasetMetadata(source.repo_id, root=source.root, revision=source.revision).stats


def fine_tuning_stats(mode: str, *, task_dataset: DatasetSource | None = None,
                      anchor_dataset: DatasetSource | None = None) -> dict | None:
    """The statistics to normalise with under ``mode``; None = keep the teacher's saved ones."""
    if mode == "teacher":
        return None
    if mode == "task":
        if task_dataset is None:
            raise ValueError("train.normalization='task' needs the task dataset (train.dataset)")
        return dataset_stats(task_dataset)
    if mode == "union":
        if task_dataset is None or anchor_dataset is None:
            raise ValueError("train.normalization='union' needs both train.dataset and cache.dataset")
        from lerobot.datasets.compute_stats import aggregate_stats

        return aggregate_stats([dataset_stats(anchor_dataset), dataset_stats(task_dataset)])
    raise ValueError(f"train.normalization={mode!r} is not one of task, teacher, union")
