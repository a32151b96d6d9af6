"""Forgetting measured in loss: a policy's own training loss on frames it was never trained on.

``HeldoutActionLoss`` preprocesses a dataset's frames once, through the *teacher's* saved pipeline
with that dataset's statistics, so every model scored sees identical inputs and targets; the
global RNG is reseeded before each measurement, so flow-matching policies (smolvla, pi0) draw the
same noise and times for every model. The loss is ``policy.forward``'s, in eval mode, without
gradients, averaged over frames.
"""

import torch

from craft_core.config import DatasetSource, PolicySource


class HeldoutActionLoss:
    """The policy's own loss on a dataset's frames, with fixed inputs and a fixed RNG."""

    def __init__(self, teacher: PolicySource, dataset: DatasetSource, *, batch_size: int, seed: int):
        from lerobot.datasets.factory import resolve_delta_timestamps
        from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata

        from craft_core.policy_io import load_policy, make_processors, policy_loading_context

        self.seed = seed
        meta = LeRobotDatasetMetadata(dataset.repo_id, root=dataset.root, revision=dataset.revision)
        with policy_loading_context(teacher.path):
            teacher_policy = load_policy(teacher)
            # The teacher's saved pipeline with this dataset's statistics: the same preprocessed
            # batches (normalised state, action targets, tokens) for every model scored.
            preprocessor, _ = make_processors(teacher_policy, dataset_stats=meta.stats, pretrained_path=teacher.path)
        frames = LeRobotDataset(dataset.repo_id, root=dataset.root, episodes=dataset.episodes,
                                revision=dataset.revision,
                                delta_timestamps=resolve_delta_timestamps(teacher_policy.config, meta),
                                video_backend=dataset.video_backend)
        loader = torch.utils.data.DataLoader(frames, batch_size=batch_size, shuffle=False)
        self.batches = [preprocessor(batch) for batch in loader]
        self.n_frames = len(frames)

    def __call__(self, policy) -> float:
        torch.manual_seed(self.seed)  # flow-matching noise and times: the same for every model
        total, count = 0.0, 0
        was_training = policy.training
        policy.eval()
        try:
            with torch.no_grad():
                for batch in self.batches:
                    loss, _ = policy.forward(dict(batch))
                    n = len(batch["action"])
                    total += float(loss) * n
                    count += n
        finally:
            policy.train(was_training)
        return total / count
