"""report.json / report.md of the eval stage, the run-comparison table and the verdicts.

The report answers "did CRaFT forget less, and at what price?": what tasks A (retained) and B
(new) are, who the teacher and students are, how the anchors were taken (layers as configured and
as resolved), then one verdict line per CRaFT run against the baseline (held-out drift within
ε_end? task-B price? task-A retention?) with the numbers behind it. Paths are written relative to
the artifacts root, so a report stays readable when the artifacts move.
"""

import functools
import json
import math
import os
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
        if any((t or {}).get("final_lambda") for t in report.get("train", {}).values()):
            row["final λ"] = _per_target(report["train"].get(run, {}).get("final_lambda"))
            row["ε_end"] = _per_target(eps_end_of(report, run))
        rows.append(row)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return [{column: row.get(column) for column in columns} for row in rows]


def _headline_column(column: str) -> bool:
    if column in ("run", "final task loss", "final λ", "ε_end"):
        return True
    if column.endswith("success %") or column.endswith(" loss"):
        return True
    return column.startswith("drift") and "cosine" not in column


def headline_rows(report: dict) -> list[dict]:
    """The comparison with only the columns that answer the question: sim success, losses, drift,
    λ and ε_end (no reward sums, intervals or cosine variants: those are in the report)."""
    rows = comparison_rows(report)
    columns = [c for c in (rows[0] if rows else {}) if _headline_column(c)]
    if "final task loss" in columns and any("task_b" in c or "task b" in c for c in columns):
        columns.remove("final task loss")  # task B is measured directly: the last batch's loss adds nothing
    return [{c: row[c] for c in columns} for row in rows]


def console_table(report: dict) -> str:
    """``headline_rows`` as an aligned plain-text table, for the end of a command-line run."""
    rows = headline_rows(report)
    if not rows:
        return ""
    columns = list(rows[0])
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _per_target(values: dict | None) -> str | None:
    """``{"prefix": 0.93, "action_output": 1.2}`` as ``prefix 0.93, action_output 1.2`` (one value: bare)."""
    if not values:
        return None
    if len(set(values.values())) == 1:  # one value for every target
        return _fmt(next(iter(values.values())))
    return ", ".join(f"{target} {_fmt(value)}" for target, value in values.items())


def eps_end_of(report: dict, run: str) -> dict[str, float] | None:
    """ε_end per target of a retaining run (from the pipeline summary), None for a run without retention."""
    constraints = report.get("about", {}).get("runs", {}).get(run, {}).get("constraints")
    return {target: c["eps_end"] for target, c in constraints.items()} if constraints else None


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


def render_markdown(report: dict, out_dir: Path | None = None) -> str:
    """The report as markdown. Paths are shown relative to ``report["artifacts_root"]`` (when set);
    links (videos, the training-curves figure) are relative to ``out_dir``, where report.md lives."""
    root = report.get("artifacts_root")
    show = functools.partial(_relative, root=root)
    about = report.get("about") or {}
    title = f"# craft report: {about['name']}" if about.get("name") else "# craft evaluation report"
    lines = [title, ""]
    lines += [f"Created {report['created']}; craft {report['craft_version']}."
              + (" Paths are relative to the artifacts root." if root else ""), ""]
    if about:
        lines += _setup_lines(report, show) + [""]
    verdict = verdict_lines(report)
    if verdict:
        lines += ["## Verdict", ""] + verdict + [""]
    lines += ["## Comparison", ""] + _table(comparison_rows(report)) + [""]
    if report.get("sim"):
        lines += ["Success: share of episodes solved, with its Wilson 95 % interval; every model is rolled out "
                  "on the same episode seeds (paired) through its own saved pre/post-processors.", ""]
    if report.get("plot"):
        lines += [f"![training curves]({_link(report['plot'], out_dir)})", ""]
    warnings = decoding_warnings(report)
    if warnings:
        lines += ["## Action decoding", ""] + warnings + [""]

    lines += ["## Runs", ""]
    lines += _table(
        [{"run": name, "policy": run["policy_type"], "checkpoint": f"`{show(run['checkpoint'])}`"}
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
                link = _link(video, out_dir)
                lines += ["", f'<video src="{link}" controls width="320"></video>', "",
                          f"Video: [{show(video)}]({link})"]
            lines += [""]

    for run, drift in report.get("drift", {}).items():
        lines += [
            f"## Drift from the teacher: {run}",
            "",
            f"{drift['n_anchors']} held-out anchors of `{show(report['store'])}`; prefix mse {_fmt(drift['mse'])}, "
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


def _relative(path, root: str | None) -> str:
    """``path`` relative to the artifacts root when it lies under it, else unchanged."""
    if path is None:
        return "–"
    if root:
        try:
            return str(Path(path).relative_to(root))
        except ValueError:
            pass
    return str(path)


def _link(path, out_dir: Path | None) -> str:
    """A markdown link target for ``path``: relative to the report's own directory when known."""
    if out_dir is None:
        return str(path)
    return os.path.relpath(Path(path), Path(out_dir))


def _setup_lines(report: dict, show) -> list[str]:
    """Tasks A/B, teacher and students, anchoring: what the comparison is about."""
    about = report["about"]
    lines = []
    for key, label in (("task_a", "Task A (retained: the teacher's task, anchors come from it)"),
                       ("task_b", "Task B (new: the students are fine-tuned on it)")):
        task = about.get("tasks", {}).get(key)
        if not task:
            continue
        name = f"`{task['name']}`" if task.get("name") else ""
        instruction = f' "{task["instruction"]}"' if task.get("instruction") else ""
        episodes = f", episodes {_episodes(task['episodes'])}" if task.get("episodes") else ""
        lines.append(f"- **{label}**: {name}{instruction} — dataset `{task['dataset']}`{episodes}")
    teacher = report.get("teacher") or {}
    teacher_run = report.get("runs", {}).get("teacher", {})
    identity = ", ".join(filter(None, [
        teacher_run.get("policy_type") or about.get("policy_type"),
        f"{teacher_run['n_parameters'] / 1e6:.3g} M parameters" if teacher_run.get("n_parameters") else None,
        f"revision {teacher['revision']}" if teacher.get("revision") else None,
    ]))
    if teacher:
        lines.append(f"- **Teacher**: `{show(teacher.get('path'))}`" + (f" ({identity})" if identity else ""))
    runs = about.get("runs", {})
    if runs:
        described = "; ".join(f"`{name}` {_describe_run(spec)}" for name, spec in runs.items())
        lines.append(f"- **Students** (each initialised from the teacher): {described}")
    anchors = about.get("anchors", {})
    if anchors:
        resolved = anchors.get("resolved_layers")
        layers = f"{anchors['layers']}" + (f" → {', '.join(map(str, resolved))}" if resolved else "")
        depth = f" of {anchors['depth']} blocks" if anchors.get("depth") else ""
        held = f" ({anchors['n_heldout']} held out for drift)" if anchors.get("n_heldout") is not None else ""
        lines.append(f"- **Anchors**: {anchors.get('n_anchors')}{held} from task A; targets "
                     f"{', '.join(anchors.get('targets', []))}; layers {layers}{depth}; pooling "
                     f"{', '.join(anchors.get('pooling', []))}")
    return lines


def _episodes(episodes: list[int]) -> str:
    if len(episodes) > 3 and episodes == list(range(episodes[0], episodes[-1] + 1)):
        return f"{episodes[0]}–{episodes[-1]}"
    return ", ".join(map(str, episodes))


def _describe_run(spec: dict) -> str:
    parts = []
    if spec.get("constraints"):
        targets = ", ".join(f"{t} (ε {_fmt(c['eps_start'])}→{_fmt(c['eps_end'])}"
                            + (f", {c['loss']})" if t == "prefix" else ")")
                            for t, c in spec["constraints"].items())
        parts.append(f"CRaFT on {targets}")
    else:
        parts.append("plain fine-tuning")
    if spec.get("replay"):
        parts.append(f"{_fmt(100 * spec['replay'])} % of each batch replayed from task A")
    if spec.get("steps"):
        parts.append(f"{spec['steps']} steps")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Verdicts


def _baseline_run(report: dict) -> str | None:
    """The plain fine-tuning run the CRaFT runs are judged against: ``baseline`` or the first run
    without retention and replay."""
    runs = report.get("about", {}).get("runs", {})
    plain = [name for name, spec in runs.items() if not spec.get("constraints") and not spec.get("replay")]
    if "baseline" in plain:
        return "baseline"
    return plain[0] if plain else None


def _sim_of_role(report: dict, role: str) -> str | None:
    roles = report.get("about", {}).get("sim_roles", {})
    return next((key for key, r in roles.items() if r == role), None)


def _success(report: dict, run: str, key: str) -> tuple[float, str] | None:
    result = report.get("sim", {}).get(run, {}).get(key)
    if not result or result.get("success_rate") is None:
        return None
    text = f"{result.get('successes', round(result['success_rate'] * result['n_episodes']))}/{result['n_episodes']}"
    return result["success_rate"], text


def _measure(report: dict, run: str, key: str) -> float | None:
    return (report.get("measures", {}).get(run) or {}).get(key)


def _drift_value(report: dict, run: str, target: str, loss: str) -> tuple[float | None, str]:
    """Held-out drift of ``target`` in the constraint's own distance where measured."""
    drift = report.get("drift", {}).get(run)
    if not drift:
        return None, ""
    if target != "prefix":
        return (drift.get("targets") or {}).get(target), ""
    if loss == "cosine":
        return drift.get("cosine"), ""
    return drift.get("mse"), "" if loss == "mse" else " (mse; the constraint uses l1)"


def _drift_clause(report: dict, run: str, baseline: str | None) -> str | None:
    constraints = report.get("about", {}).get("runs", {}).get(run, {}).get("constraints") or {}
    parts, within = [], []
    for target, constraint in constraints.items():
        value, note = _drift_value(report, run, target, constraint["loss"])
        if value is None:
            continue
        ok = value <= constraint["eps_end"]
        within.append(ok)
        text = f"{target} {_fmt(value)} {'≤' if ok else '>'} ε_end {_fmt(constraint['eps_end'])}{note}"
        base, _ = _drift_value(report, baseline, target, constraint["loss"]) if baseline else (None, "")
        if base is not None:
            text += f", baseline {_fmt(base)}" + (f" ({base / value:.3g}× more)" if value > 0 and base > value else "")
        parts.append(text)
    if not parts:
        return None
    verdict = "yes" if all(within) else ("no" if not any(within) else "partly")
    return f"drift within ε: **{verdict}** ({'; '.join(parts)})"


def _compare_success(report: dict, run: str, baseline: str | None, key: str) -> str | None:
    mine = _success(report, run, key)
    if mine is None:
        return None
    text = f"{key} success {mine[1]}"
    base = _success(report, baseline, key) if baseline else None
    if base is not None:
        text += f" vs baseline {base[1]}"
    teacher = _success(report, "teacher", key)
    if teacher is not None:
        text += f" (teacher {teacher[1]})"
    return text


def _compare_loss(report: dict, run: str, baseline: str | None, name: str, value_of) -> str | None:
    mine = value_of(run)
    if mine is None:
        return None
    text = f"{name} {_fmt(mine)}"
    base = value_of(baseline) if baseline else None
    if base is not None:
        text += f" vs baseline {_fmt(base)}" + (f" ({100 * (mine - base) / abs(base):+.1f} %)" if base else "")
    teacher = value_of("teacher")
    if teacher is not None:
        text += f" (teacher {_fmt(teacher)})"
    return text


def _price_clause(report: dict, run: str, baseline: str | None) -> str | None:
    parts = []
    key = _sim_of_role(report, "task_b")
    if key:
        parts.append(_compare_success(report, run, baseline, key))
    parts.append(_compare_loss(report, run, baseline, "held-out task-B loss",
                               lambda r: _measure(report, r, "task_b_loss")))
    parts = [p for p in parts if p]
    if not parts:  # only the training loss is known
        parts.append(_compare_loss(report, run, baseline, "final training loss",
                                   lambda r: (report.get("train", {}).get(r) or {}).get("final_task_loss")))
    parts = [p for p in parts if p]
    return f"task-B price: {'; '.join(parts)}" if parts else None


def _retention_clause(report: dict, run: str, baseline: str | None) -> str:
    parts = []
    key = _sim_of_role(report, "task_a")
    if key:
        parts.append(_compare_success(report, run, baseline, key))
        mine, base = _success(report, run, key), _success(report, baseline, key) if baseline else None
        teacher = _success(report, "teacher", key)
        if teacher is not None and teacher[0] == 0 and mine is not None:
            parts[-1] += ": **nothing to retain** (the teacher does not solve task A)"
        elif mine is not None and base is not None:
            parts[-1] += (": **more kept than the baseline**" if mine[0] > base[0]
                          else ": **no better than the baseline**" if mine[0] == base[0]
                          else ": **less kept than the baseline**")
    parts.append(_compare_loss(report, run, baseline, "held-out task-A loss",
                               lambda r: _measure(report, r, "task_a_loss")))
    parts = [p for p in parts if p]
    return f"task-A retention: {'; '.join(parts)}" if parts else "task-A retention: not measured (no task-A sim or loss)"


def verdict_lines(report: dict) -> list[str]:
    """One line per CRaFT run against the baseline: drift within ε? task-B price? task-A retention?"""
    runs = report.get("about", {}).get("runs", {})
    baseline = _baseline_run(report)
    lines = []
    for run, spec in runs.items():
        if run == baseline or run not in report.get("runs", {}):
            continue
        clauses = [_drift_clause(report, run, baseline), _price_clause(report, run, baseline),
                   _retention_clause(report, run, baseline)]
        lambdas = (report.get("train", {}).get(run) or {}).get("final_lambda")
        if lambdas:
            clauses.append(f"final λ {_per_target(lambdas)}")
        against = f" vs {baseline}" if baseline else ""
        lines.append(f"- **{run}{against}** — " + "; ".join(c for c in clauses if c) + ".")
    return lines


# ---------------------------------------------------------------------------------------------
# What the pipeline compared (computed from the config when the stages are planned)


def _task_instruction(env: str | None, task: str | None) -> str | None:
    if env is None or task is None:
        return None
    if env == "metaworld":
        from importlib import resources

        data = json.loads((resources.files("lerobot.envs") / "metaworld_config.json").read_text())
        return data["TASK_DESCRIPTIONS"].get(task)
    from craft_core.demo.sim_datasets import ALOHA_TASKS, PUSHT_TASKS

    return {"pusht": PUSHT_TASKS, "aloha": ALOHA_TASKS}.get(env, {}).get(task)


def _sim_role(sim, assets) -> str | None:
    """Which task a sim entry rolls out: ``task_a``, ``task_b`` or None (unknown)."""
    if sim.name in ("task_a", "task_b"):
        return sim.name
    if assets is None:
        return None
    if sim.task is not None:
        for role in ("task_a", "task_b"):
            if sim.task == getattr(assets, role):
                return role
        return None
    # gym-pusht's env is the push-T task; the demo records it as task `push_t`
    if sim.env == assets.env == "pusht":
        return next((role for role in ("task_a", "task_b") if getattr(assets, role) == "push_t"), None)
    return None


def pipeline_summary(cfg) -> dict:
    """What a pipeline compares, for the report: tasks A/B, anchoring, each run's constraints, which
    sim entry rolls out which task. JSON, computed from the ``PipelineConfig`` alone."""
    from craft_core.evaluation.sim import sim_key

    assets = cfg.assets
    env = assets.env if assets else None
    tasks = {}
    for role, dataset in (("task_a", cfg.cache.dataset), ("task_b", cfg.train.dataset)):
        name = getattr(assets, role) if assets else None
        tasks[role] = {"name": name, "instruction": _task_instruction(env, name), "dataset": dataset.repo_id,
                       "episodes": dataset.episodes}
    runs = {}
    for run, spec in cfg.runs.items():
        train = cfg.run_train_config(run)
        retention = train.retention
        constraints = {}
        if retention is not None:
            for target in (list(retention.targets) if retention.targets else list(cfg.cache.targets)):
                c = retention.constraint(target)
                constraints[target] = {"loss": c.loss, "eps_start": c.eps_start, "eps_end": c.eps_end,
                                       "lambda_init": c.lambda_init}
        runs[run] = {"constraints": constraints, "replay": spec.replay.fraction if spec.replay else None,
                     "steps": train.steps}
    return {
        "name": cfg.name,
        "policy_type": assets.policy_type if assets else None,
        "env": env,
        "tasks": tasks,
        "anchors": {"n_anchors": cfg.cache.n_anchors, "layers": list(cfg.cache.layers),
                    "pooling": list(cfg.cache.pooling), "targets": list(cfg.cache.targets)},
        "runs": runs,
        "sim_roles": {sim_key(sim): _sim_role(sim, assets) for sim in cfg.eval.sim},
    }


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
    (out_dir / "report.md").write_text(render_markdown(safe, out_dir))
    return safe
