"""lerobot's training options through the pipeline, and a train-stage checkpoint under lerobot's own CLI.

The ``smoke`` pipeline (tiny pi0_fast, gym-pusht, cache / train / eval for real) on datasets whose
camera is named differently from the policy's (``observation.images.front``: lerobot's ``rename_map``
on the cache and train datasets), with bf16 autocast (``cache.autocast`` + ``train.mixed_precision``),
LoRA, gradient accumulation, image transforms and a policy option; then ``lerobot-eval`` itself rolls
the CRaFT run's LoRA checkpoint out for one short pusht episode (through craft's loading context,
which the tiny policies need: ``craft_core.lerobot_cli``).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


RENAME = {"observation.images.front": "observation.image"}  # dataset camera -> the policy's


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tiny_pi0_fast, pusht_datasets):
    from craft_core.config import load_preset
    from craft_core.pipeline import run_pipeline
    from tests.fixtures.data import FIXTURE_PUSHT_TASKS, renamed_copy

    tmp_path = tmp_path_factory.mktemp("options_flow")
    task, retained = FIXTURE_PUSHT_TASKS  # the tiny teacher knows `retained`; it is fine-tuned on `task`
    renamed = {name: renamed_copy(pusht_datasets[name], tmp_path / f"{name}_renamed", {v: k for k, v in RENAME.items()})
               for name in (task, retained)}

    def source(name):
        return json.dumps({"repo_id": renamed[name]["repo_id"], "root": str(renamed[name]["root"]), "rename_map": RENAME})

    cfg = load_preset("smoke", [
        f"artifacts_root={tmp_path / 'artifacts'}",
        "assets=null",
        f"cache.teacher={json.dumps({'path': str(tiny_pi0_fast)})}",
        f"cache.dataset={source(retained)}",
        "cache.autocast=bf16",
        f"train.dataset={source(task)}",
        "train.mixed_precision=bf16",
        "train.grad_accum_steps=2",
        "train.peft={rank: 4, alpha: 8, target_modules: [q_proj, v_proj]}",
        "train.image_transforms={enable: true, max_num_transforms: 1}",
        "train.policy={n_action_steps: 2}",
    ])
    return tmp_path, run_pipeline(cfg, log=lambda line: None)


def test_options_through_the_pipeline(pipeline_run):
    _, refs = pipeline_run
    craft = refs["train_craft"].result
    assert craft["grad_accum_steps"] == 2 and craft["peft"] == "lora"
    assert "memory plan: total" in craft["memory_plan"]
    assert craft["memory_plan_bytes"]["notes"]["precision"] == "bf16"
    # the cache stage read the renamed camera and ran the teacher under the autocast it records
    from craft_core.store import open_anchor_store

    store = open_anchor_store(refs["cache"].result["store_url"])
    assert store.attrs["compute"]["autocast"] == "bfloat16"
    assert "observation.images.front" not in json.dumps(store.attrs["input_spec"])
    checkpoint = Path(craft["checkpoint"])
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["use_peft"] is True and config["n_action_steps"] == 2
    assert (checkpoint / "adapter_model.safetensors").is_file()
    # the checkpoint's own preprocessor renames the dataset's camera, as lerobot-train's does
    steps = json.loads((checkpoint / "policy_preprocessor.json").read_text())["steps"]
    assert any(step.get("config", {}).get("rename_map") == RENAME for step in steps)
    report = json.loads(Path(refs["report"].result["report_json"]).read_text())
    assert set(report["sim"]) >= {"baseline", "craft", "teacher"}  # the eval stage loaded the LoRA checkpoints


def test_tiny_lora_checkpoint_under_lerobot_eval(pipeline_run):
    from craft_core.lerobot_cli import eval_command

    tmp_path, refs = pipeline_run
    checkpoint = Path(refs["train_craft"].result["checkpoint"])
    out = tmp_path / "lerobot_eval"
    command = eval_command(checkpoint, "--env.type=pusht", "--env.episode_length=5", "--eval.n_episodes=1",
                           "--eval.batch_size=1", "--policy.device=cpu", f"--output_dir={out}")
    assert command.startswith(f"{sys.executable} -m craft_core.lerobot_cli eval --policy.path=")
    assert refs["train_craft"].result["lerobot_eval"].startswith(command.split(" --env.type")[0])
    run = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads((out / "eval_info.json").read_text())
    assert info["overall"]["n_episodes"] == 1


def test_a_moved_tiny_checkpoint_still_runs_under_lerobot_eval(pipeline_run):
    """A checkpoint records the absolute tokenizer paths it was trained with; once those are gone (the
    checkpoint or its source folder moved), craft's CLI points them at the checkpoint's own copies."""
    import shutil

    from craft_core.lerobot_cli import eval_command

    tmp_path, refs = pipeline_run
    moved = tmp_path / "moved" / "pretrained_model"
    shutil.copytree(refs["train_craft"].result["checkpoint"], moved)
    gone = str(tmp_path / "gone")
    config = json.loads((moved / "config.json").read_text())
    for field in ("text_tokenizer_name", "action_tokenizer_name"):
        config[field] = f"{gone}/{field}"
    (moved / "config.json").write_text(json.dumps(config))
    pipeline = json.loads((moved / "policy_preprocessor.json").read_text())
    for step in pipeline["steps"]:
        for key in ("tokenizer_name", "paligemma_tokenizer_name", "action_tokenizer_name"):
            if key in step.get("config", {}):
                step["config"][key] = f"{gone}/{key}"
    (moved / "policy_preprocessor.json").write_text(json.dumps(pipeline))
    out = tmp_path / "lerobot_eval_moved"
    command = eval_command(moved, "--env.type=pusht", "--env.episode_length=5", "--eval.n_episodes=1",
                           "--eval.batch_size=1", "--policy.device=cpu", f"--output_dir={out}")
    run = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((out / "eval_info.json").read_text())["overall"]["n_episodes"] == 1
