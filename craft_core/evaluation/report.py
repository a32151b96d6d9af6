"""report.json / report.md of the eval stage, and the run-comparison table."""

import json
import math
from pathlib import Path

import numpy as np


def comparison_rows(report: dict) -> list[dict]:
    """One row per evaluated run: success and reward per sim env, drift, final task loss.

    Keys are human-readable column names; a value is None where a run has no such result (e.g.
    drift without an anchor store, a final task loss for the untrained teacher).
    """
    rows = []
    for run in report["runs"]:
        row: dict = {"run": run}
        for key, result in report.get("sim", {}).get(run, {}).items():
            row[f"{key} success %"] = 100.0 * result["success_rate"]
            if result.get("success_ci95"):
                low, high = result["success_ci95"]
                row[f"{key} success 95% CI"] = f"{100 * low:.0f}–{100 * high:.0f}"
            if result.get("action_decode_failure_rate") is not None:
                row[f"{key} decode failures %"] = 100.0 * result["action_decode_failure_rate"]
            row[f"{key} avg sum reward"] = result["avg_sum_reward"]
            row[f"{key} avg max reward"] = result["avg_max_reward"]
        drift = report.get("drift", {}).get(run)
        if report.get("drift"):
            row["drift mse"] = drift["mse"] if drift else None
            row["drift cosine"] = drift["cosine"] if drift else None
            for target in _drift_targets(report):
                row[f"drift {target}"] = (drift or {}).get("targets", {}).get(target)
        for key, value in report.get("measures", {}).get(run, {}).items():
            row[key.replace("_", " ")] = value
        if report.get("train"):
            row["final task loss"] = report["train"].get(run, {}).get("final_task_loss")
        rows.append(row)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return [{column: row.get(column) for column in columns} for row in rows]


def _drift_targets(report: dict) -> list[str]:
    """The non-prefix targets drift was measured for (the prefix is the mse/cosine columns)."""
    return list(dict.fromkeys(t for d in report.get("drift", {}).values() if d for t in d.get("targets", {})
                              if t != "prefix"))


# Above this share of failed action decodings a rollout measures lerobot's zero-action fallback,
# not the policy.
DECODE_FAILURE_WARNING = 0.5


def decoding_warnings(report: dict) -> list[str]:
    """One line per (run, sim) whose token-decoding policy mostly failed to decode an action."""
    lines = []
    for run, per_env in report.get("sim", {}).items():
        for key, result in per_env.items():
            rate = result.get("action_decode_failure_rate")
            if rate is not None and rate > DECODE_FAILURE_WARNING:
                lines.append(
                    f"- **{run} on {key} was not really evaluated**: {100 * rate:.0f} % of its "
                    f"{result['action_decodings']} action decodings failed, and lerobot replaces an undecodable "
                    "action chunk with zeros, so this success rate measures zero actions, not the policy."
                )
    return lines


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    return str(value)


def _table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(none)"]
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return lines


def render_markdown(report: dict) -> str:
    lines = ["# craft evaluation report", ""]
    lines += [f"Created {report['created']}; craft {report['craft_version']}.", ""]
    lines += ["## Comparison", ""] + _table(comparison_rows(report)) + [""]
    if report.get("sim"):
        lines += ["Success: share of episodes solved, with its Wilson 95 % interval; every model is rolled out "
                  "on the same episode seeds (paired) through its own saved pre/post-processors.", ""]
    warnings = decoding_warnings(report)
    if warnings:
        lines += ["## Action decoding", ""] + warnings + [""]

    lines += ["## Runs", ""]
    lines += _table(
        [{"run": name, "policy": run["policy_type"], "checkpoint": f"`{run['checkpoint']}`"}
         for name, run in report["runs"].items()]
    )
    lines += [""]

    for run, per_env in report.get("sim", {}).items():
        for key, result in per_env.items():
            lines += [
                f"## Simulation: {run} on {key}",
                "",
                f"{result['n_episodes']} episodes of at most {result['episode_length']} steps, "
                f"seeds from {result['seed']}; {result['s_per_episode']:.2f} s per episode. "
                + _success_sentence(result),
                "",
            ]
            lines += _table([{k: v for k, v in ep.items()} for ep in result["episodes"]])
            for video in result["videos"]:
                lines += ["", f"Video: [{video}]({video})"]
            lines += [""]

    for run, drift in report.get("drift", {}).items():
        lines += [
            f"## Drift from the teacher: {run}",
            "",
            f"{drift['n_anchors']} held-out anchors of `{report['store']}`; prefix mse {_fmt(drift['mse'])}, "
            f"cosine distance {_fmt(drift['cosine'])} (means over layers × pooled vectors)"
            + "".join(f"; {t} {_fmt(v)}" for t, v in drift.get("targets", {}).items() if t != "prefix") + ".",
            "",
        ]
        if drift["per_vector"]:
            lines += _table(drift["per_vector"]) + [""]

    if report.get("fingerprints"):
        lines += ["## Stage fingerprints", ""]
        lines += _table([{"stage": s, "fingerprint": f"`{f}`"} for s, f in report["fingerprints"].items()])
        lines += [""]

    timings = report.get("timings", {})
    if timings:
        lines += ["## Timings", ""] + _table([{k: v for k, v in timings.items()}]) + [""]
    return "\n".join(lines)


def _success_sentence(result: dict) -> str:
    text = f"Success {result.get('successes', '?')}/{result['n_episodes']}"
    if result.get("success_ci95"):
        low, high = result["success_ci95"]
        text += f" (95 % CI {100 * low:.0f}–{100 * high:.0f} %)"
    if result.get("action_decodings"):
        text += (f"; {result['action_decode_failures']} of {result['action_decodings']} action decodings failed "
                 "(replaced by zeros by lerobot)")
    return text + "."


def json_safe(value):
    """NaN/inf are not JSON: write them as null (lerobot reports nan for empty aggregates)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_report(report: dict, out_dir: Path) -> dict:
    """Write report.json (strict JSON) and report.md; returns the JSON-safe report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    safe = json_safe(report)
    (out_dir / "report.json").write_text(json.dumps(safe, indent=2, allow_nan=False) + "\n")
    (out_dir / "report.md").write_text(render_markdown(safe))
    return safe
