"""Which normalisation lets one saved checkpoint serve both tasks? ``train.normalization`` measured.

    python experiments/normalization.py                    # preset metaworld, smolvla, seed 0
    python experiments/normalization.py --jobs 2 --seeds 0 1 --policy smolvla

A fine-tuned checkpoint is deployed with its one saved pre/post-processor pipeline, so the
statistics it is saved with decide whether it can still do task A at all. Every combination of
how the teacher was normalised (``assets.teacher_stats``: its own task-A statistics, or statistics
aggregated over both tasks) and what fine-tuning saves (``train.normalization``: task, teacher,
union) runs the preset's pipeline with a baseline and a prefix + action-output CRaFT run; every
model is rolled out on both tasks through its own saved pipeline only. Writes
``normalization.json`` / ``normalization.md`` (default ``experiments/results/metaworld_normalization``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from craft_core.evaluation.sim import wilson_interval  # noqa: E402
from craft_core.normalization import NormalizationMismatchError  # noqa: E402
from experiments.retention import REPO_ROOT, load_experiment, run_one  # noqa: E402

TEACHER_STATS = ("task_a", "both_tasks")
MODES = ("task", "teacher", "union")
RUNS = "runs={baseline: {retention: false}, craft_action: {}}"


def measure(preset: str, policy: str, seed: int, teacher_stats: str, mode: str, threads: int) -> dict:
    overrides = [f"policies=[{policy}]", f"seeds=[{seed}]", RUNS, f"assets.teacher_stats={teacher_stats}",
                 f"train.normalization={mode}"]
    cfg = load_experiment(preset, None, overrides)
    try:
        result = run_one(cfg.model_dump_json(), policy, seed, threads)
    except NormalizationMismatchError as exc:  # the train stage refuses statistics it cannot train under
        refusal = str(exc).splitlines()[0]
        return {"rows": [{"teacher_stats": teacher_stats, "normalization": mode, "seed": seed, "run": run,
                          "refused": refusal} for run in ("baseline", "craft_action")], "wall_s": None}
    rows = []
    for row in result["rows"]:
        cells = {"teacher_stats": teacher_stats, "normalization": mode, "seed": seed, "run": row["run"]}
        for task in ("task_a", "task_b"):
            episodes = result["episodes"][row["run"]][task]
            successes = sum(episodes.values())
            cells[f"{task}_success"] = successes / len(episodes)
            cells[f"{task}_ci95"] = list(wilson_interval(successes, len(episodes)))
            cells[f"{task}_episodes"] = len(episodes)
        rows.append(cells)
    return {"rows": rows, "wall_s": result["wall_s"]}


def render(rows: list[dict], policy: str) -> str:
    lines = [f"# Normalisation of the fine-tuned checkpoint ({policy}; success in simulation, its own saved "
             "pipeline only)", "",
             "| teacher stats | train.normalization | seed | run | task A success % [95 % CI] | "
             "task B success % [95 % CI] |", "|---|---|---|---|---|---|"]
    for row in rows:
        if row.get("refused"):
            lines.append(f"| {row['teacher_stats']} | {row['normalization']} | {row['seed']} | {row['run']} | "
                         f"refused before training: {row['refused']} | – |")
            continue
        cells = [f"{100 * row[f'{t}_success']:.0f} [{100 * row[f'{t}_ci95'][0]:.0f}–{100 * row[f'{t}_ci95'][1]:.0f}]"
                 for t in ("task_a", "task_b")]
        lines.append(f"| {row['teacher_stats']} | {row['normalization']} | {row['seed']} | {row['run']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="metaworld")
    parser.add_argument("--policy", default="smolvla")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--teacher-stats", nargs="+", default=list(TEACHER_STATS), choices=TEACHER_STATS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    parser.add_argument("--out", default=str(REPO_ROOT / "experiments" / "results" / "metaworld_normalization"))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.time()
    work = [(stats, mode, seed) for stats in args.teacher_stats for mode in args.modes for seed in args.seeds]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(measure, args.preset, args.policy, seed, stats, mode, args.threads)
                   for stats, mode, seed in work]
        results = [future.result() for future in futures]
    rows = [row for result in results for row in result["rows"]]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "normalization.json").write_text(json.dumps(
        {"preset": args.preset, "policy": args.policy, "seeds": args.seeds, "rows": rows,
         "wall_s": time.time() - started}, indent=1))
    (out / "normalization.md").write_text(render(rows, args.policy))
    print(render(rows, args.policy))


if __name__ == "__main__":
    main()
