"""Retention experiments: does CRaFT make fine-tuning forget less than plain fine-tuning?

    python experiments/retention.py                          # --preset retention: gym-pusht, losses and drift
    python experiments/retention.py --preset metaworld       # MetaWorld pair: success rates in simulation
    python experiments/retention.py --preset P --out DIR --jobs 2 policies=[smolvla] experiment.seeds=[3,4]

An experiment is a pipeline config (configs/experiments/<preset>.yaml: the same assets / cache /
train / runs / eval sections as the flow's presets) plus an ``experiment`` section naming the
policy types and seeds. For every (policy, seed) the pipeline runs through craft's own stage
machinery (``craft_core.pipeline.run_pipeline``): the assets and the anchor cache do not depend on
the seed, so they are built once per policy and reused from their content-addressed stage
directories; every fine-tuning run and the eval stage run per seed. A rerun reuses everything
that is complete; a killed run resumes.

This script only aggregates what the eval stages reported: one row per (policy, run, seed) in
``results.json`` (``rows``), mean ± std over seeds, paired differences against the baseline run
with bootstrap 95 % confidence intervals, a markdown table (``results.md``) and plots
(``plots/<policy>.png``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from craft_core.config import ExperimentConfig, load_config, preset_path  # noqa: E402

RESULTS_SCHEMA = "craft.experiment/2"
EXPERIMENT_PRESETS = REPO_ROOT / "configs" / "experiments"
BASELINE = "baseline"
BOOTSTRAP_SAMPLES = 10_000
# Top-level shorthands of the command line for the experiment section's fields.
SHORTHANDS = {"policies": "experiment.policies", "seeds": "experiment.seeds"}


def load_experiment(preset: str | None, config: str | None, overrides: list[str]) -> ExperimentConfig:
    path = Path(config) if config else preset_path(preset or "retention", EXPERIMENT_PRESETS)
    overrides = [_expand_shorthand(item) for item in overrides]
    return load_config(path, overrides, model=ExperimentConfig)


def _expand_shorthand(item: str) -> str:
    key, sep, value = item.partition("=")
    return f"{SHORTHANDS[key.strip()]}={value}" if sep and key.strip() in SHORTHANDS else item


# ---------------------------------------------------------------------------------------------
# One (policy, seed): the pipeline, then what its eval stage reported
# ---------------------------------------------------------------------------------------------


def run_one(config_json: str, policy: str, seed: int, threads: int) -> dict:
    """Run the pipeline of one (policy, seed) and collect its rows; runs in a worker process too."""
    import torch

    from craft_core.metrics import read_metrics
    from craft_core.pipeline import run_pipeline

    torch.set_num_threads(threads)
    cfg = ExperimentConfig.model_validate_json(config_json)
    pipeline = cfg.pipeline_for(policy, seed)
    started = time.time()
    refs = run_pipeline(pipeline, log=lambda message: print(f"[{policy} seed {seed}] {message}", flush=True))
    report = json.loads(Path(refs["report"].result["report_json"]).read_text())

    rows = [{"policy": policy, "run": run, "seed": seed, **report_metrics(report, run)} for run in report["runs"]]
    train_logs = {
        run: [{k: v for k, v in r.items() if k in ("step", "task_loss", "retention_loss", "projected")
               or k.startswith(("lambda/", "epsilon/", "retention_loss/"))}
              for r in read_metrics(refs[f"train_{run}"].result["metrics"])]
        for run in pipeline.runs
    }
    costs = {}
    for stage, ref in refs.items():
        manifest = json.loads((Path(ref.path) / "manifest.json").read_text())
        costs[stage] = {"wall_s": manifest.get("duration_s"), "cpu_s": manifest.get("cpu_s"), "path": ref.path}
    return {
        "policy": policy, "seed": seed, "rows": rows, "curves": report.get("curves", {}), "train_logs": train_logs,
        "episodes": episode_successes(report), "stage_costs": costs, "wall_s": time.time() - started,
        "report": refs["report"].result["report_md"],
        "eps_end": pipeline.train.retention.eps_end if pipeline.train.retention else None,
        "heldout": {"drift_sets": report.get("drift_sets", {}), "action_loss_frames": report.get("action_loss_frames", {}),
                    "heldout_anchors": next((d["n_anchors"] for d in report["drift"].values() if d), None)},
    }


def report_metrics(report: dict, run: str) -> dict:
    """The numbers of one run in an eval report, flat: ``<name>_loss``, ``drift_*``, ``<sim>_success``..."""
    from craft_core.evaluation.drift import drift_columns

    metrics = dict(report.get("measures", {}).get(run, {}))
    drift = report.get("drift", {}).get(run)
    if drift:
        metrics.update(drift_columns(drift, "anchors"))
    for name, sim in report.get("sim", {}).get(run, {}).items():
        metrics[f"{name}_success"] = sim["success_rate"]
        if sim.get("action_decode_failure_rate") is not None:
            metrics[f"{name}_decode_failures"] = sim["action_decode_failure_rate"]
    train = report.get("train", {}).get(run) or {}
    if train.get("final_task_loss") is not None:
        metrics["final_task_loss"] = train["final_task_loss"]
    for target, value in (train.get("final_lambda") or {}).items():
        metrics[f"final_lambda_{target}"] = value
    return metrics


def episode_successes(report: dict) -> dict:
    """run -> sim name -> {episode seed: success}: the pairing key of the bootstrap."""
    out: dict = {}
    for run, sims in report.get("sim", {}).items():
        for name, sim in sims.items():
            out.setdefault(run, {})[name] = {str(e["seed"]): bool(e["success"]) for e in sim["episodes"]}
    return out


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> dict:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "std": None, "n": 0, "values": []}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def bootstrap_ci(differences: list[float], *, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of paired differences (resampling the pairs)."""
    import numpy as np

    values = np.asarray(differences, dtype=float)
    if len(values) == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(BOOTSTRAP_SAMPLES, len(values)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def summarise(results: list[dict]) -> dict:
    """Per policy: mean ± std of every metric per run, and paired differences against the baseline."""
    summary: dict = {}
    for policy in dict.fromkeys(r["policy"] for r in results):
        mine = [r for r in results if r["policy"] == policy]
        rows = [row for r in mine for row in r["rows"]]
        runs = list(dict.fromkeys(row["run"] for row in rows))
        metrics = list(dict.fromkeys(k for row in rows for k in row if k not in ("policy", "run", "seed")))
        per_run = {run: {m: mean_std([row.get(m) for row in rows if row["run"] == run]) for m in metrics}
                   for run in runs}
        differences = {}
        if BASELINE in runs:
            for run in runs:
                if run in (BASELINE, "teacher") or run.startswith("teacher"):
                    continue
                differences[run] = _paired_differences(mine, run, metrics)
        summary[policy] = {"runs": per_run, "differences_vs_baseline": differences}
    return summary


def _paired_differences(results: list[dict], run: str, metrics: list[str]) -> dict:
    """``run`` minus the baseline, paired by seed (losses, drift) or by episode (sim success)."""
    out = {}
    for metric in metrics:
        if metric.endswith("_success"):
            name = metric.removesuffix("_success")
            pairs = [float(r["episodes"][run][name][ep]) - float(r["episodes"][BASELINE][name][ep])
                     for r in results if name in r["episodes"].get(run, {}) and name in r["episodes"].get(BASELINE, {})
                     for ep in r["episodes"][run][name] if ep in r["episodes"][BASELINE][name]]
            unit = "episodes"
        else:
            by_seed = {r["seed"]: {row["run"]: row.get(metric) for row in r["rows"]} for r in results}
            pairs = [v[run] - v[BASELINE] for v in by_seed.values()
                     if v.get(run) is not None and v.get(BASELINE) is not None]
            unit = "seeds"
        if not pairs:
            continue
        lo, hi = bootstrap_ci(pairs)
        out[metric] = {"mean": statistics.fmean(pairs), "ci95": [lo, hi], "n_pairs": len(pairs), "paired_by": unit,
                       "ci_excludes_zero": lo > 0 or hi < 0}
    return out


# ---------------------------------------------------------------------------------------------
# Tables and plots
# ---------------------------------------------------------------------------------------------


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _cell(stat: dict, percent: bool = False) -> str:
    if stat["mean"] is None:
        return "–"
    scale = 100.0 if percent else 1.0
    if stat["n"] == 1 or stat["std"] == 0.0:
        return f"{stat['mean'] * scale:.4g}"
    return f"{stat['mean'] * scale:.4g} ± {stat['std'] * scale:.2g}"


def _metric_order(metric: str) -> tuple[int, str]:
    """Success in simulation first (what users judge a policy by), then losses, drift, the rest."""
    for rank, marker in enumerate(("_success", "_decode_failures", "_loss", "drift_")):
        if marker in metric:
            return rank, ""  # stable: keeps the report's own order within a group
    return 4, ""


def render_markdown(results: dict) -> str:
    config = results["config"]
    lines = [f"# Retention experiment `{config['name']}`", ""]
    lines += [f"Policies {config['experiment']['policies']}, seeds {config['experiment']['seeds']}; mean ± std over "
              f"seeds (success rates in %). {results['machine']}; {results['wall_s'] / 60:.1f} min wall in all, "
              f"{results['compute']['cpu_s'] / 60:.1f} CPU-min over the stages run now or earlier.", ""]
    for policy, policy_summary in results["summary"].items():
        per_run = policy_summary["runs"]
        metrics = sorted(dict.fromkeys(m for stats in per_run.values() for m in stats), key=_metric_order)
        lines += [f"## {policy}", "", "| run | " + " | ".join(metrics) + " |", "|" + "---|" * (len(metrics) + 1)]
        for run, stats in per_run.items():
            cells = [_cell(stats[m], percent=m.endswith("_success")) for m in metrics]
            lines.append(f"| {run} | " + " | ".join(cells) + " |")
        lines.append("")
        if policy_summary["differences_vs_baseline"]:
            lines += ["Paired differences against the baseline (run − baseline), mean and bootstrap 95 % CI:", "",
                      "| run | metric | difference | 95 % CI | pairs |", "|---|---|---|---|---|"]
            for run, diffs in policy_summary["differences_vs_baseline"].items():
                for metric, d in sorted(diffs.items(), key=lambda item: _metric_order(item[0])):
                    scale = 100.0 if metric.endswith("_success") else 1.0
                    lines.append(f"| {run} | {metric} | {d['mean'] * scale:+.4g} | "
                                 f"[{d['ci95'][0] * scale:+.4g}, {d['ci95'][1] * scale:+.4g}] | "
                                 f"{d['n_pairs']} {d['paired_by']} |")
            lines.append("")
    return "\n".join(lines)


def plot_policy(policy: str, results: list[dict], out_png: Path) -> Path | None:
    """Curves over fine-tuning steps (losses, drift, λ, ε) and, with sim success, a bar chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in results if r["policy"] == policy]
    curve_keys = list(dict.fromkeys(k for r in mine for points in r["curves"].values() for p in points
                                    for k in p if k != "step" and not k.endswith("_cosine")))
    success_keys = list(dict.fromkeys(k for r in mine for row in r["rows"] for k in row if k.endswith("_success")))
    dual_keys = list(dict.fromkeys(k for r in mine for log in r["train_logs"].values() for p in log for k in p
                                   if k.startswith(("lambda/", "epsilon/"))))
    panels = [*curve_keys, *dual_keys] + (["success"] if success_keys else [])
    runs = list(dict.fromkeys(run for r in mine for run in r["train_logs"]))
    colors = {run: f"C{i}" for i, run in enumerate(runs)}
    n_cols = 2
    n_rows = math.ceil(len(panels) / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(10, 2.8 * n_rows), squeeze=False)
    for ax, key in zip(axes.flat, panels):
        if key == "success":
            _success_bars(ax, mine, success_keys)
            continue
        for r in mine:
            teacher = next((row for row in r["rows"] if row["run"] == "teacher"), {})
            for run in runs:
                if key.startswith(("lambda/", "epsilon/")):
                    points = [(p["step"], p[key]) for p in r["train_logs"].get(run, []) if p.get(key) is not None]
                else:
                    points = [(0, teacher.get(key))] + [(p["step"], p.get(key)) for p in r["curves"].get(run, [])]
                    points = [(s, v) for s, v in points if v is not None]
                if points:
                    steps, values = zip(*points)
                    ax.plot(steps, values, color=colors[run], alpha=0.8, linewidth=1,
                            label=run if r is mine[0] else None)
        if key.startswith("drift"):
            ax.set_yscale("symlog", linthresh=1e-4)  # the teacher's own drift (step 0) is exactly 0
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("fine-tuning step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{policy}: one line per seed")
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


def _success_bars(ax, results: list[dict], success_keys: list[str]) -> None:
    rows = [row for r in results for row in r["rows"]]
    runs = list(dict.fromkeys(row["run"] for row in rows))
    width = 0.8 / len(success_keys)
    for i, key in enumerate(success_keys):
        stats = [mean_std([row.get(key) for row in rows if row["run"] == run]) for run in runs]
        means = [100 * (s["mean"] or 0.0) for s in stats]
        errors = [100 * (s["std"] or 0.0) for s in stats]
        ax.bar([j + i * width for j in range(len(runs))], means, width, yerr=errors, label=key, capsize=3)
    ax.set_xticks([j + width * (len(success_keys) - 1) / 2 for j in range(len(runs))], runs, rotation=20, fontsize=8)
    ax.set_ylabel("success %")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7)
    ax.set_title("success in simulation (mean ± std over seeds)", fontsize=10)


# ---------------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------------


def run_experiment(cfg: ExperimentConfig, out: Path, *, jobs: int = 1, threads: int = 1, log=print) -> dict:
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    # Seed-major order: with several jobs the policy types' teachers and caches are built side by
    # side, and a second seed of a policy waits on its teacher's stage lock only when it must.
    work = [(policy, seed) for seed in cfg.experiment.seeds for policy in cfg.experiment.policies]
    config_json = cfg.model_dump_json()
    if jobs <= 1:
        results = [run_one(config_json, policy, seed, threads) for policy, seed in work]
    else:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(run_one, config_json, policy, seed, threads) for policy, seed in work]
            results = [future.result() for future in futures]
    order = {policy: i for i, policy in enumerate(cfg.experiment.policies)}
    results.sort(key=lambda r: (order[r["policy"]], r["seed"]))

    stage_costs = {cost["path"]: cost for r in results for cost in r["stage_costs"].values()}
    output = {
        "schema": RESULTS_SCHEMA,
        "config": cfg.model_dump(mode="json"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {jobs} job(s) x {threads} torch thread(s)",
        "rows": [row for r in results for row in r["rows"]],
        "summary": summarise(results),
        "per_seed": [{k: r[k] for k in ("policy", "seed", "curves", "train_logs", "episodes", "report", "eps_end",
                                        "heldout", "wall_s")} for r in results],
        "compute": {"cpu_s": sum(c["cpu_s"] or 0.0 for c in stage_costs.values()),
                    "stage_wall_s": sum(c["wall_s"] or 0.0 for c in stage_costs.values()),
                    "stages": stage_costs},
        "wall_s": time.time() - started,
    }
    (out / "plots").mkdir(exist_ok=True)
    for policy in cfg.experiment.policies:
        plot_policy(policy, results, out / "plots" / f"{policy}.png")
    (out / "results.json").write_text(json.dumps(output, indent=1, allow_nan=False, default=_json_default))
    (out / "results.md").write_text(render_markdown(output))
    log(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return output


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON-serialisable: {value!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", help="experiment preset in configs/experiments/ (default: retention)")
    source.add_argument("--config", help="experiment YAML file")
    parser.add_argument("--out", help="where results.json/.md and plots/ go (default: experiments/results/<preset>)")
    parser.add_argument("--jobs", type=int, default=1, help="(policy, seed) pipelines run at once, one process each")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)),
                        help="torch threads per job")
    parser.add_argument("overrides", nargs="*", help="a.b=c overrides, e.g. policies=[smolvla] experiment.seeds=[3]")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = load_experiment(args.preset, args.config, args.overrides)
    name = args.preset or (Path(args.config).stem if args.config else "retention")
    out = Path(args.out) if args.out else REPO_ROOT / "experiments" / "results" / name
    started = time.time()

    def log(message: str) -> None:
        print(f"[experiment {time.time() - started:7.1f}s] {message}", flush=True)

    results = run_experiment(cfg, out, jobs=args.jobs, threads=args.threads, log=log)
    log(f"done: {(time.time() - started) / 60:.1f} min elapsed")
    print(render_markdown(results))


if __name__ == "__main__":
    main()
