"""Checkpoints in lerobot's layout, plus craft's own training state.

    <out_dir>/checkpoints/<step:06d>/
        pretrained_model/    policy (config.json, model.safetensors) + pre/post processors:
                             loadable by ``from_pretrained`` and by lerobot-eval
        training_state/      lerobot's files (optimizer, scheduler, rng, training_step.json)
                             + craft_state.json (λ, ε schedule, anchor position, skip counter)
                             + craft_run.json (the config the run was started with)
    <out_dir>/checkpoints/last -> <step:06d>

The heavy lifting is lerobot's own ``save_training_state`` / ``load_training_state``; craft only
adds its state and writes each checkpoint into a scratch folder that is renamed into place, so a
run killed while saving never leaves a half-written ``last``.
"""

import json
import os
import shutil
from pathlib import Path

from lerobot.common.train_utils import (
    get_step_checkpoint_dir,
    load_training_state,
    save_training_state,
    update_last_checkpoint,
)
from lerobot.utils.constants import (
    CHECKPOINTS_DIR,
    LAST_CHECKPOINT_LINK,
    PRETRAINED_MODEL_DIR,
    TRAINING_STATE_DIR,
)

from craft_core.policy_io import carry_plugin_files

CRAFT_STATE_FILE = "craft_state.json"
CRAFT_RUN_FILE = "craft_run.json"
CRAFT_TRAIN_CONFIG_FILE = "craft_train_config.json"


class ResumeConfigMismatch(RuntimeError):
    """The output folder holds a checkpoint of a run with another configuration."""


def last_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint ``checkpoints/last`` points to, or None for a fresh run."""
    link = Path(out_dir) / CHECKPOINTS_DIR / LAST_CHECKPOINT_LINK
    if not link.is_symlink() and not link.exists():
        return None
    target = link.resolve()
    if not (target / TRAINING_STATE_DIR / CRAFT_STATE_FILE).is_file():
        raise FileNotFoundError(
            f"{link} points to {target}, which is not a complete craft checkpoint (no "
            f"{TRAINING_STATE_DIR}/{CRAFT_STATE_FILE}); delete {link} to start over"
        )
    return target


def _diff(saved, current, prefix="") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            out += _diff(saved.get(key), current.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == current else [f"{prefix[:-1]}: checkpoint {saved!r} != now {current!r}"]


def check_same_run(checkpoint_dir: Path, run: dict) -> None:
    """Refuse to resume a checkpoint written by a differently configured run."""
    saved = json.loads((checkpoint_dir / TRAINING_STATE_DIR / CRAFT_RUN_FILE).read_text())
    differences = _diff(saved, json.loads(json.dumps(run)))
    if differences:
        raise ResumeConfigMismatch(
            f"cannot resume from {checkpoint_dir}: it was written with another configuration ("
            + "; ".join(differences)
            + f"). Use a new output folder, or delete {checkpoint_dir.parent} to start over."
        )


def save_checkpoint(
    out_dir: Path,
    step: int,
    total_steps: int,
    *,
    policy,
    preprocessor,
    postprocessor,
    optimizer,
    scheduler,
    craft_state: dict,
    run: dict,
    num_processes: int,
    batch_size: int,
    policy_source_dir: Path | None = None,
) -> Path:
    """Write checkpoint ``step`` and point ``checkpoints/last`` at it; returns its folder."""
    final_dir = get_step_checkpoint_dir(Path(out_dir), total_steps, step)
    scratch_dir = final_dir.parent / f".partial-{final_dir.name}"
    if scratch_dir.exists():
        shutil.rmtree(scratch_dir)
    pretrained_dir = scratch_dir / PRETRAINED_MODEL_DIR
    policy.save_pretrained(pretrained_dir)
    if hasattr(policy, "peft_config"):
        # As lerobot-train saves PEFT runs: the adapters (adapter_config.json naming the base policy,
        # adapter_model.safetensors) plus the policy config (use_peft: true) to load them with.
        policy.config.save_pretrained(pretrained_dir)
    preprocessor.save_pretrained(pretrained_dir)
    postprocessor.save_pretrained(pretrained_dir)
    (pretrained_dir / CRAFT_TRAIN_CONFIG_FILE).write_text(json.dumps(run, indent=2))
    # What a policy loaded through a folder plugin needs to load again (tiny: marker + tokenizers).
    carry_plugin_files(policy_source_dir, pretrained_dir)

    save_training_state(scratch_dir, step, optimizer, scheduler, num_processes=num_processes,
                        batch_size=batch_size)
    state_dir = scratch_dir / TRAINING_STATE_DIR
    (state_dir / CRAFT_RUN_FILE).write_text(json.dumps(run, indent=2))
    (state_dir / CRAFT_STATE_FILE).write_text(json.dumps(craft_state, indent=2))

    if final_dir.exists():  # a stale checkpoint of an earlier attempt past the resumed step
        shutil.rmtree(final_dir)
    os.replace(scratch_dir, final_dir)
    update_last_checkpoint(final_dir)
    return final_dir


def load_checkpoint_state(checkpoint_dir: Path, optimizer, scheduler) -> tuple[int, dict]:
    """Restore optimizer, scheduler and RNG states (lerobot's loader); return (step, craft_state)."""
    step, _, _ = load_training_state(checkpoint_dir, optimizer, scheduler)
    craft_state = json.loads((checkpoint_dir / TRAINING_STATE_DIR / CRAFT_STATE_FILE).read_text())
    if craft_state.get("step") != step:
        raise RuntimeError(
            f"{checkpoint_dir}: training_step.json says step {step} but {CRAFT_STATE_FILE} says "
            f"{craft_state.get('step')}; the checkpoint is inconsistent, delete it to resume from an earlier one"
        )
    return step, craft_state


def pretrained_model_dir(checkpoint_dir: Path) -> Path:
    return Path(checkpoint_dir) / PRETRAINED_MODEL_DIR
