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


# A feature whose typical value lies this many scale units from the statistics it is normalised
# with gives inputs or regression targets no network trains on (measured on MetaWorld: task B's
# constant gripper action under task A's zero-variance statistics is ~1e8 after normalisation, and
# the task loss reached 2.5e15).
UNTRAINABLE_OFFSET = 1e3


class NormalizationMismatchError(ValueError):
    """The statistics a run would train and deploy with cannot represent the task's data."""


def _center_and_scale(stats: dict, mode) -> tuple | None:
    import numpy as np

    name = getattr(mode, "value", mode)
    if name == "MEAN_STD" and {"mean", "std"} <= stats.keys():
        return np.asarray(stats["mean"], float), np.asarray(stats["std"], float)
    if name == "MIN_MAX" and {"min", "max"} <= stats.keys():
        low, high = np.asarray(stats["min"], float), np.asarray(stats["max"], float)
        return (low + high) / 2, (high - low) / 2
    quantiles = {"QUANTILES": ("q01", "q99"), "QUANTILE10": ("q10", "q90")}.get(name)
    if quantiles and set(quantiles) <= stats.keys():
        low, high = (np.asarray(stats[q], float) for q in quantiles)
        return (low + high) / 2, (high - low) / 2
    return None


def statistics_offsets(preprocessor, task_stats: dict) -> dict[str, list[float]]:
    """Per normalised feature, how far the task data's mean lies from the centre of the statistics
    ``preprocessor`` normalises with, in their scale units (std for MEAN_STD, half-range otherwise)."""
    import numpy as np
    from lerobot.processor.normalize_processor import NormalizerProcessorStep

    offsets: dict[str, list[float]] = {}
    for step in getattr(preprocessor, "steps", []):
        if not isinstance(step, NormalizerProcessorStep):
            continue
        for key, feature in step.features.items():
            mode = step.norm_map.get(feature.type)
            if key not in step.stats or key not in task_stats or "mean" not in task_stats[key]:
                continue
            center_scale = _center_and_scale(step.stats[key], mode)
            if center_scale is None:
                continue
            center, scale = center_scale
            task_mean = np.asarray(task_stats[key]["mean"], float)
            if task_mean.shape != center.shape:
                continue
            offsets[key] = (np.abs(task_mean - center) / (np.abs(scale) + step.eps)).reshape(-1).tolist()
    return offsets


def check_task_fits_statistics(preprocessor, task_stats: dict, mode: str) -> list[str]:
    """Refuse statistics under which the task's data cannot be trained on; returns the features
    that lie more than 10 scale units off (worth a warning) when none is beyond reach."""
    offsets = statistics_offsets(preprocessor, task_stats)
    hopeless = [(key, i, value) for key, values in offsets.items() for i, value in enumerate(values)
                if value > UNTRAINABLE_OFFSET]
    if hopeless:
        described = ", ".join(f"{key}[{i}] at {value:.3g}" for key, i, value in hopeless[:6])
        raise NormalizationMismatchError(
            f"train.normalization={mode!r}: the task dataset's data lies far outside the statistics the checkpoint "
            f"would be trained and saved with ({described} scale units from their centre; a feature the teacher "
            "never saw vary normalises to ~1/eps). Training on it diverges. Use train.normalization='union' "
            "(statistics covering the anchor and task datasets), or a teacher whose statistics already cover the "
            "new task; 'task' keeps the task's own statistics but then the retained task is served on them."
        )
    return [f"{key}[{i}] at {value:.3g}" for key, values in offsets.items() for i, value in enumerate(values)
            if value > 10.0]
