"""Independent stages side by side or one after the other: the pipeline's train and eval stages
with ``concurrent_stages`` off vs on, on the same config (default: the offline CPU demo).

Setup (not timed): the flow's assets and cache stages, once. Timed, per side: the flow run of the
``train`` and ``eval`` stages (every fine-tuning run, the evaluation of each policy, the report)
after their outputs were deleted, so both sides do exactly the same work. Sequential runs each stage
in the flow's own process (CPU: no process start-up); concurrent submits the independent ones
together, each in its own process (what keeps torch's RNG and accelerate's state apart). Rounds
alternate the order; the best of each side is kept.

Prints one JSON object as its last line: seconds of each side and their ratio (concurrent /
sequential; < 1 means side by side is faster).
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def clear_downstream(root: Path) -> None:
    for stage_dir in root.iterdir():
        if stage_dir.name.startswith(("train_", "eval_")) or stage_dir.name == "report":
            shutil.rmtree(stage_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the assets and cache here between runs")
    parser.add_argument("overrides", nargs="*", metavar="A.B=C")
    args = parser.parse_args()

    from craft_core.config import load_preset
    from flows.craft_flow import craft

    with tempfile.TemporaryDirectory(prefix="bench_parallel_stages_") as tmp:
        root = (args.workdir or Path(tmp)) / "artifacts"
        base = [f"artifacts_root={root}", *args.overrides]
        craft(config=load_preset(args.preset, base + ["stages=[assets,cache]"]))
        times: dict[str, list[float]] = {"sequential": [], "concurrent": []}
        for round_index in range(args.rounds):
            order = ("sequential", "concurrent") if round_index % 2 == 0 else ("concurrent", "sequential")
            for side in order:
                clear_downstream(root)
                config = load_preset(args.preset, base + ["stages=[train,eval]",
                                                          f"concurrent_stages={str(side == 'concurrent').lower()}"])
                started = time.perf_counter()
                craft(config=config)
                times[side].append(time.perf_counter() - started)
                print(f"round {round_index}, {side}: {times[side][-1]:.1f} s", flush=True)
        n_runs = len(load_preset(args.preset).runs)

    sequential, concurrent = min(times["sequential"]), min(times["concurrent"])
    print(json.dumps({
        "preset": args.preset, "overrides": args.overrides, "fine_tuning_runs": n_runs, "rounds": args.rounds,
        "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
        "sequential_rounds_s": times["sequential"], "concurrent_rounds_s": times["concurrent"],
        "sequential_s": sequential, "concurrent_s": concurrent, "ratio": concurrent / sequential,
        "faster": "concurrent" if concurrent < sequential else "sequential",
    }))


if __name__ == "__main__":
    main()
