"""A small, documented sweep of CRaFT's own settings around an experiment preset.

    python experiments/sweep.py                 # preset retention, pi0_fast, seed 0, the variants below

Only the method's settings change (ε schedule/ε_end, λ learning rate, K, layers, merge mode);
data, teacher, steps, learning rate, seeds and the evaluation are the preset's. Every variant runs
through the pipeline, so the baseline run (which does not depend on retention settings) is one
cached stage shared by every row, and a variant that changes only training settings reuses the
teacher and the anchor cache. Writes sweep.json / sweep.md next to the experiment's results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.retention import REPO_ROOT, load_experiment, run_one, summarise  # noqa: E402

# name -> overrides of the preset. "preset" = the experiment's own settings.
VARIANTS: dict[str, list[str]] = {
    "preset": [],
    "K=5 (fewer retention steps)": ["train.retention.every_k=5"],
    "eps_end=0.001 (tighter)": ["train.retention.eps_end=0.001"],
    "eps linear schedule": ["train.retention.eps_schedule=linear"],
    "lambda_lr=1.0": ["train.retention.lambda_lr=1.0"],
    "merge=task_priority": ["train.retention.merge=task_priority"],
    "merge=equal": ["train.retention.merge=equal"],
    "layers=[-1] only": ["cache.layers=[-1]"],
    "lambda_init=0 (dual ascent only)": ["train.retention.lambda_init=0.0"],
}

COLUMNS = ("task_b_loss", "task_a_loss", "drift_anchors", "drift_episodes")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Sweep CRaFT's settings (one policy, few seeds)")
    parser.add_argument("--preset", default="retention")
    parser.add_argument("--policy", default="pi0_fast")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="*", help="Subset of variant names (default: all)")
    parser.add_argument("--out", default=str(REPO_ROOT / "experiments" / "results" / "retention"))
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.time()

    def log(message: str) -> None:
        print(f"[sweep {time.time() - started:7.1f}s] {message}", flush=True)

    rows = []
    for name, overrides in VARIANTS.items():
        if args.variants and name not in args.variants:
            continue
        cfg = load_experiment(args.preset, None, [f"policies=[{args.policy}]", f"seeds={args.seeds}", *overrides])
        results = [run_one(cfg.model_dump_json(), args.policy, seed, args.threads) for seed in args.seeds]
        summary = summarise(results)[args.policy]["runs"]
        baseline, craft = summary["baseline"], summary["craft"]
        rows.append({
            "variant": name,
            "overrides": overrides,
            "baseline": {c: baseline[c]["mean"] for c in COLUMNS},
            "craft": {c: craft[c]["mean"] for c in COLUMNS},
            "teacher": {c: summary["teacher"][c]["mean"] for c in COLUMNS},
            "drift_ratio": baseline["drift_anchors"]["mean"] / max(craft["drift_anchors"]["mean"], 1e-12),
            "final_lambda": craft["final_lambda_prefix"]["values"],
        })
        log(f"{name}: {json.dumps(rows[-1]['craft'])}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"policy": args.policy, "seeds": args.seeds, "rows": rows}, indent=1))
    lines = [
        f"# CRaFT settings sweep ({args.policy}, seeds {args.seeds}; means over seeds, final checkpoint)", "",
        f"Baseline (same for every row): task-B loss {rows[0]['baseline']['task_b_loss']:.4g}, task-A loss "
        f"{rows[0]['baseline']['task_a_loss']:.4g}, drift {rows[0]['baseline']['drift_anchors']:.4g}; teacher task-A "
        f"loss {rows[0]['teacher']['task_a_loss']:.4g}.", "",
        "| variant | task-B loss | task-A loss | drift held-out anchors | drift held-out episodes "
        "| drift baseline/CRaFT | final λ |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        c = row["craft"]
        lambdas = ", ".join(f"{v:.3g}" for v in row["final_lambda"])
        lines.append(
            f"| {row['variant']} | {c['task_b_loss']:.4g} | {c['task_a_loss']:.4g} | {c['drift_anchors']:.3g} "
            f"| {c['drift_episodes']:.3g} | {row['drift_ratio']:.1f}× | {lambdas} |"
        )
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
