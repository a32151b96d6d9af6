"""Replay of old data: a fixed share of the task batches drawn from another dataset's frames.

``ReplaySampler`` wraps lerobot's episode-aware sampler over the task dataset and yields indices
into ``ConcatDataset([task, replay])``: in every epoch, position ``k`` serves a replay frame iff
``floor((k + 1) f) > floor(k f)`` (a share ``f`` spread evenly), the next frame of a seeded
permutation of the replay frames; every other position serves the task sampler's frame. Which
positions replay, and which frame, are pure functions of (seed, epoch, position), so a resumed
run continues the same stream; the wrapped sampler's state API (``state_dict``/``load_state_dict``,
what lerobot's ``compute_sampler_state`` fills) is passed through unchanged.
"""

import math
from collections.abc import Iterator

import numpy as np
import torch


class ReplaySampler(torch.utils.data.Sampler[int]):
    def __init__(self, task_sampler, n_task_frames: int, n_replay_frames: int, fraction: float, seed: int):
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"replay fraction must lie in (0, 1), got {fraction}")
        if n_replay_frames < 1:
            raise ValueError("the replay dataset has no frames")
        self.task_sampler = task_sampler
        self.n_task_frames = n_task_frames
        self.n_replay_frames = n_replay_frames
        self.fraction = fraction
        self.seed = seed

    def __len__(self) -> int:
        return len(self.task_sampler)

    def state_dict(self) -> dict:
        return self.task_sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.task_sampler.load_state_dict(state)

    def is_replay(self, position: int) -> bool:
        return math.floor((position + 1) * self.fraction) > math.floor(position * self.fraction)

    def _replay_order(self, epoch: int) -> torch.Tensor:
        seed = int(np.random.SeedSequence([self.seed, epoch, 1]).generate_state(1, dtype=np.uint64)[0])
        return torch.randperm(self.n_replay_frames, generator=torch.Generator().manual_seed(seed))

    def __iter__(self) -> Iterator[int]:
        state = self.task_sampler.state_dict()  # the epoch and position this iteration starts at
        epoch, position = state["epoch"], state["start_index"]
        order = self._replay_order(epoch)
        for task_index in iter(self.task_sampler):
            if self.is_replay(position):
                replayed = math.floor(position * self.fraction)
                yield self.n_task_frames + int(order[replayed % self.n_replay_frames])
            else:
                yield task_index
            position += 1


def check_compatible(task_dataset, replay_dataset, field: str) -> None:
    """Refuse a replay dataset whose frames do not have the task dataset's features."""
    task_features = {k: tuple(v["shape"]) for k, v in task_dataset.meta.features.items()}
    replay_features = {k: tuple(v["shape"]) for k, v in replay_dataset.meta.features.items()}
    if task_features != replay_features:
        differ = sorted(k for k in set(task_features) | set(replay_features)
                        if task_features.get(k) != replay_features.get(k))
        raise ValueError(
            f"{field}: the replay dataset's features differ from the task dataset's at {differ}; replay frames "
            "must have the same cameras, state and action"
        )
