"""How long a rerun of an unchanged pipeline takes against a running Prefect server.

Starts a private local server (free port, temporary PREFECT_HOME) unless PREFECT_API_URL is
already set, runs the flow `craft` with a preset twice into a fresh artifacts root, and reads
the second run's task states from the API: `stages_rerun` lists every stage task that was not
Cached, i.e. that executed again. Expected: `stages_rerun == []` and a second run that costs
only Prefect's own overhead.

    python benchmarks/bench_rerun.py [--preset smoke] [overrides...]

Last stdout line: one JSON object with first_run_s, cached_rerun_s, stages_rerun, ...
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from deployments.local_stack import LocalPrefect  # noqa: E402


def run_flow(api_url: str, preset: str, overrides: list[str], env: dict) -> tuple[float, str]:
    """One `python flows/craft_flow.py` run, as a user runs it; returns (seconds, flow run id)."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "flows/craft_flow.py", "--preset", preset, *overrides],
        cwd=REPO_ROOT, env={**env, "PREFECT_API_URL": api_url}, capture_output=True, text=True,
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"flow run failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return elapsed, result.stdout + result.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description="first run vs cached rerun of the craft flow")
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="craft-bench-rerun-"))
    overrides = [f"artifacts_root={workdir / 'artifacts'}", *args.overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

    stack = LocalPrefect(workdir / "prefect-home", extra_env=env)
    try:
        stack.start_server()
        first_s, _ = run_flow(stack.api_url, args.preset, overrides, stack.env)
        second_s, _ = run_flow(stack.api_url, args.preset, overrides, stack.env)
        flow_runs = stack.api("POST", "/flow_runs/filter", json={"sort": "START_TIME_DESC", "limit": 2})
        latest, previous = flow_runs[0], flow_runs[1]
        second_tasks = stack.task_runs(latest["id"])
        first_tasks = stack.task_runs(previous["id"])
    finally:
        stack.stop()

    record = {
        "benchmark": "bench_rerun",
        "preset": args.preset,
        "first_run_s": round(first_s, 2),
        "cached_rerun_s": round(second_s, 2),
        "rerun_over_first": round(second_s / first_s, 4),
        "stages_first_run": {name: run["state_name"] for name, run in sorted(first_tasks.items())},
        "stages_rerun": sorted(name for name, run in second_tasks.items() if run["state_name"] != "Cached"),
        "n_stage_tasks_rerun_run": len(second_tasks),
        "note": "both runs are `python flows/craft_flow.py` subprocesses against one running local server",
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
