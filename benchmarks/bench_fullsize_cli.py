"""A real-size train-stage checkpoint under lerobot's own CLI: plain ``lerobot-eval`` and ``from_pretrained``.

The tests run lerobot-eval on the tiny demo policies' checkpoints; those need craft's loading
context (``python -m craft_core.lerobot_cli eval``) because lerobot hard-codes other sizes. This
script checks the claim for a policy at its **real configuration**, where no context is involved:
smolvla as lerobot 0.6.1 builds it by default (SmolVLM2-500M's sizes, first 16 layers, 512 px,
450 M parameters; random weights and a local tokenizer folder, because the hub is not reachable:
``bench_fullsize.real_config``), on a gym-pusht dataset recorded here (so lerobot's pusht env
matches the policy's features). Then, all through craft's own stage code:

1. the teacher folder: ``make_policy`` + ``make_pre_post_processors``, saved with lerobot's
   ``save_pretrained`` (what a hub checkpoint is);
2. **cache**: ``craft_core.extraction.extract_anchors`` (targets ``prefix`` + ``action_output``);
3. **train**: ``craft_core.train.train`` (the train stage's loop), one CRaFT step with K = 1, for
   each run asked for: ``lora`` (``train.peft``, rank 16 on q/v projections) and ``full``;
4. the checkpoint it writes, through lerobot alone: ``SmolVLAPolicy.from_pretrained`` (for LoRA:
   lerobot's ``make_policy`` with ``use_peft``, as lerobot-eval loads it) +
   ``make_pre_post_processors(pretrained_path=...)`` and one ``select_action``; then
   ``lerobot-eval --policy.path=<checkpoint> --env.type=pusht`` as a subprocess (the console script
   itself, no craft code on its path), one short episode; its ``eval_info.json`` is read back.

``craft_core.lerobot_cli.eval_command`` must give the plain ``lerobot-eval`` command for these
checkpoints (no loading context), and the train stage's result records that command.

Cost on a 2-core CPU: about 1.8 GB of weights per saved folder; each real-size CRaFT step a few
minutes; lerobot-eval decodes one 50-action chunk (10 flow steps) per ``n_action_steps``.

Last stdout line: one JSON object, per run: the train result's checkpoint and ``lerobot_eval``
command, seconds per phase, the loading checks, lerobot-eval's exit code and its ``overall``.

    .venv/bin/python benchmarks/bench_fullsize_cli.py [--runs lora full] [--episode-length 4]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fullsize  # noqa: E402  (sets the offline environment and craft's path before torch loads)

LORA = {"rank": 16, "target_modules": ["q_proj", "v_proj"]}
TARGETS = ["prefix", "action_output"]


def build_teacher(work: Path, meta) -> Path:
    """A real-size smolvla folder as lerobot saves one: config, weights, both processor pipelines."""
    import torch
    from lerobot.policies.factory import make_policy, make_pre_post_processors

    torch.manual_seed(0)
    cfg = bench_fullsize.real_config("smolvla", work, "float32")
    policy = make_policy(cfg, ds_meta=meta)
    preprocessor, postprocessor = make_pre_post_processors(cfg, dataset_stats=meta.stats)
    folder = work / "teacher"
    policy.save_pretrained(folder)
    preprocessor.save_pretrained(folder)
    postprocessor.save_pretrained(folder)
    return folder


def load_like_lerobot(checkpoint: Path, meta) -> dict:
    """The checkpoint through lerobot alone (no craft import in the loading), one action out."""
    import torch
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import make_policy, make_pre_post_processors
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    config = PreTrainedConfig.from_pretrained(checkpoint)
    if getattr(config, "use_peft", False):
        config.pretrained_path = checkpoint  # what lerobot-eval does with --policy.path
        policy = make_policy(config, ds_meta=meta)
    else:
        policy = SmolVLAPolicy.from_pretrained(checkpoint)
    preprocessor, postprocessor = make_pre_post_processors(policy.config, pretrained_path=str(checkpoint))
    policy.eval()
    features = meta.features
    observation = {"task": ["push the T-shaped block onto the target"]}
    for key, feature in features.items():
        if key.startswith("observation."):
            shape = feature["shape"]
            if feature["dtype"] in ("image", "video"):
                observation[key] = torch.rand(1, shape[2], shape[0], shape[1])
            else:
                observation[key] = torch.zeros(1, *shape)
    with torch.no_grad():
        action = postprocessor(policy.select_action(preprocessor(observation)))
    return {"class": type(policy).__name__, "action_shape": list(action.shape),
            "action_finite": bool(torch.isfinite(action).all())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--episode-length", type=int, default=4, help="pusht steps lerobot-eval rolls out")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="keep the folders here (default: a temporary folder)")
    args = parser.parse_args()

    import torch
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata

    from craft_core.config import CacheConfig, DatasetSource, PeftSettings, PolicySource, RetentionConfig, TrainConfig
    from craft_core.demo.sim_datasets import record_dataset
    from craft_core.extraction import extract_anchors
    from craft_core.lerobot_cli import eval_command
    from craft_core.train import train

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    summary: dict = {"policy": "smolvla", "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench_fullsize_cli_") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        sources = {}
        for task in ("push_t", "circle"):  # task data (push_t) and the teacher's "old" data (circle) for anchors
            root = work / f"pusht_{task}"
            if not root.exists():
                record_dataset("pusht", task, repo_id=f"local/pusht_{task}", root=root, n_episodes=1, max_steps=12,
                               image_size=96, seed=0)
            sources[task] = DatasetSource(repo_id=f"local/pusht_{task}", root=str(root))
        meta = LeRobotDatasetMetadata(sources["push_t"].repo_id, root=sources["push_t"].root)

        t0 = time.perf_counter()
        teacher = build_teacher(work, LeRobotDatasetMetadata(sources["circle"].repo_id, root=sources["circle"].root))
        summary["teacher_build_s"] = round(time.perf_counter() - t0, 1)
        summary["teacher_weights_bytes"] = (teacher / "model.safetensors").stat().st_size

        t0 = time.perf_counter()
        store_url = str(work / "anchors.zarr")
        extract_anchors(CacheConfig(teacher=PolicySource(path=str(teacher)), dataset=sources["circle"], n_anchors=2,
                                    batch_size=2, chunk_anchors=2, heldout_fraction=0.0, device="cpu",
                                    targets=TARGETS, dtype="float16"), store_url)
        summary["cache_s"] = round(time.perf_counter() - t0, 1)

        for run in args.runs:
            entry: dict = {}
            summary["runs"][run] = entry
            cfg = TrainConfig(dataset=sources["push_t"], steps=1, batch_size=1, device="cpu", seed=0, save_every=1,
                              peft=PeftSettings(**LORA) if run == "lora" else None,
                              retention=RetentionConfig(every_k=1, targets={t: {} for t in TARGETS},
                                                        anchor_batch_size=1))
            t0 = time.perf_counter()
            result = train(cfg, teacher=PolicySource(path=str(teacher)), store_url=store_url, out_dir=work / f"train_{run}")
            entry["train_s"] = round(time.perf_counter() - t0, 1)
            checkpoint = Path(result["checkpoint"])
            entry.update(checkpoint=str(checkpoint), lerobot_eval_recorded=result["lerobot_eval"],
                         memory_plan=result["memory_plan"], final_lambda=result["final_lambda"],
                         checkpoint_files=sorted(p.name for p in checkpoint.iterdir()))
            expected = eval_command(checkpoint)
            entry["plain_lerobot_eval_command"] = expected.startswith("lerobot-eval ")

            t0 = time.perf_counter()
            entry["lerobot_loading"] = load_like_lerobot(checkpoint, meta)
            entry["load_s"] = round(time.perf_counter() - t0, 1)

            out = work / f"lerobot_eval_{run}"
            command = ["lerobot-eval", f"--policy.path={checkpoint}", "--env.type=pusht",
                       f"--env.episode_length={args.episode_length}", "--eval.n_episodes=1", "--eval.batch_size=1",
                       "--policy.device=cpu", f"--output_dir={out}"]
            lerobot_eval = Path(sys.executable).with_name("lerobot-eval")  # the venv's console script
            command[0] = str(lerobot_eval)
            t0 = time.perf_counter()
            proc = subprocess.run(command, capture_output=True, text=True, cwd=work,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""})
            entry["lerobot_eval_s"] = round(time.perf_counter() - t0, 1)
            entry["lerobot_eval_exit"] = proc.returncode
            if proc.returncode == 0:
                entry["lerobot_eval_overall"] = json.loads((out / "eval_info.json").read_text())["overall"]
            else:
                entry["lerobot_eval_stderr_tail"] = proc.stderr[-3000:]
                print(proc.stderr[-3000:], file=sys.stderr)
            print(json.dumps({run: entry}), file=sys.stderr, flush=True)
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    summary["all_ok"] = all(e.get("lerobot_eval_exit") == 0 and e["plain_lerobot_eval_command"]
                            and e["lerobot_loading"]["action_finite"] for e in summary["runs"].values())
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
