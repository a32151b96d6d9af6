"""A small, documented sweep of CRaFT's own settings around the retention experiment's preset.

    python experiments/sweep.py                 # pi0_fast, seed 0, the variants below

Only the method's settings change (ε schedule/ε_end, λ learning rate, K, layers, merge mode);
data, teacher, steps, learning rate, seeds and the evaluation are the preset's, and the baseline
run is shared (same cache entry), so every row is compared with the same baseline. Writes
sweep.json / sweep.md next to the experiment's results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.retention import REPO_ROOT, _merge, load_experiment_config, run_policy  # noqa: E402

# name -> overrides of the preset (nested like the YAML). "preset" = the experiment's own settings.
VARIANTS: dict[str, dict] = {
    "preset": {},
    "K=5 (fewer retention steps)": {"finetune": {"retention": {"every_k": 5}}},
    "eps_end=0.001 (tighter)": {"finetune": {"retention": {"eps_end": 0.001}}},
    "eps linear schedule": {"finetune": {"retention": {"eps_schedule": "linear"}}},
    "lambda_lr=1.0": {"finetune": {"retention": {"lambda_lr": 1.0}}},
    "merge=task_priority": {"finetune": {"retention": {"merge": "task_priority"}}},
    "merge=equal": {"finetune": {"retention": {"merge": "equal"}}},
    "layers=[-1] only": {"anchors": {"layers": [-1]}},
    "lambda_init=0 (dual ascent only)": {"finetune": {"retention": {"lambda_init": 0.0}}},
}

COLUMNS = ("task_b_loss", "task_a_loss", "drift_anchors", "drift_episodes")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Sweep CRaFT's settings (one policy, few seeds)")
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "experiments" / "retention.yaml"))
    parser.add_argument("--policy", default="pi0_fast")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="*", help="Subset of variant names (default: all)")
    parser.add_argument("--out", default=str(REPO_ROOT / "experiments" / "results"))
    parser.add_argument("--work", default=str(REPO_ROOT / "artifacts" / "experiment"))
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.time()

    def log(message: str) -> None:
        print(f"[sweep {time.time() - started:7.1f}s] {message}", flush=True)

    base = load_experiment_config(args.config, [f"policies=[{args.policy}]", f"seeds={args.seeds}"])
    rows = []
    for name, override in VARIANTS.items():
        if args.variants and name not in args.variants:
            continue
        data = base.model_dump()
        _merge(data, override)
        cfg = type(base).model_validate(data)
        result = run_policy(cfg, args.policy, Path(args.work), log)
        summary = result["summary"]
        rows.append({
            "variant": name,
            "overrides": override,
            "baseline": {c: summary["baseline"][c]["mean"] for c in COLUMNS},
            "craft": {c: summary["craft"][c]["mean"] for c in COLUMNS},
            "teacher": {c: summary["teacher"][c]["mean"] for c in COLUMNS},
            "targets": summary["targets"],
            "final_lambda": [r["train_log"][-1]["lambda"] for r in result["runs"]["craft"]],
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
            f"| {c['drift_episodes']:.3g} | {row['targets']['drift_ratio_baseline_over_craft']:.1f}× | {lambdas} |"
        )
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
