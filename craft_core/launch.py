"""Multi-process training through torch's own launcher (torchrun), for ``train.num_processes`` > 1.

The train stage writes the run's arguments to ``<out_dir>/launch/args.json`` and starts

    python -m torch.distributed.run --standalone --nproc_per_node N -m craft_core.launch ARGS
    (several machines: --nnodes M --node_rank R --master_addr A --master_port P instead of --standalone)

Every rank runs the one training loop (:func:`craft_core.train.train`): accelerate turns the
torchrun environment into DDP with NCCL on GPUs (each rank on the GPU of its LOCAL_RANK) or gloo on
CPU, and craft's retention gradients, L_ret and hence λ are averaged over ranks
(``craft_core.distributed``). Rank 0 writes checkpoints, ``metrics.jsonl`` and ``result.json``
exactly as one process does; every rank also leaves its own ``launch/result.rank<r>.json`` so the
agreement of the ranks can be checked. While the processes run, the stage reports progress from
``metrics.jsonl``. A killed launch is resumed by running the stage again: every rank restarts from
``checkpoints/last``.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from craft_core.config import DatasetSource, PolicySource, TrainConfig

LAUNCH_DIR = "launch"
ProgressFn = Callable[[int, int, dict], None]
REPO_ROOT = Path(__file__).resolve().parent.parent


def check_processes_fit(cfg: TrainConfig) -> None:
    """Refuse more processes per machine than this machine has devices (GPUs, or CPU cores on CPU)."""
    import torch

    from craft_core.devices import uses_cuda

    if uses_cuda(cfg.device):
        count, what = torch.cuda.device_count(), "CUDA device(s)"
    else:
        count, what = os.cpu_count() or 1, "CPU core(s)"
    if cfg.processes_per_machine > count:
        raise ValueError(
            f"train.num_processes={cfg.num_processes} over train.num_machines={cfg.num_machines} needs "
            f"{cfg.processes_per_machine} process(es) on this machine, but it has {count} {what} "
            f"(train.device={cfg.device!r}); lower train.num_processes or add machines (train.num_machines)"
        )


def launcher_command(cfg: TrainConfig, args_path: Path) -> list[str]:
    """The torchrun command line of one machine of the run."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(cfg.processes_per_machine)]
    if cfg.num_machines == 1:
        cmd += ["--standalone"] if cfg.main_process_port is None else [
            "--nnodes", "1", "--master_addr", cfg.main_process_addr or "127.0.0.1",
            "--master_port", str(cfg.main_process_port)]
    else:
        cmd += ["--nnodes", str(cfg.num_machines), "--node_rank", str(cfg.machine_rank),
                "--master_addr", str(cfg.main_process_addr), "--master_port", str(cfg.main_process_port)]
    return cmd + ["--module", "craft_core.launch", str(args_path)]


def _report_progress(metrics_path: Path, steps: int, progress: ProgressFn | None, seen: int) -> int:
    """Relay rank 0's newest metrics line as progress; returns how many lines have been seen."""
    if progress is None or not metrics_path.is_file():
        return seen
    lines = metrics_path.read_text().splitlines()
    complete = [line for line in lines if line.endswith("}")]
    if len(complete) > seen:
        try:
            record = json.loads(complete[-1])
        except json.JSONDecodeError:
            return seen
        shown = {k: v for k, v in record.items() if k in ("task_loss", "retention_loss", "samples_per_s")}
        progress(int(record.get("step", 0)), steps, shown)
        return len(complete)
    return seen


def _stop_orphaned_ranks(launch_dir: Path, args_path: Path) -> None:
    """SIGKILL ranks of an earlier launch of this run that outlived their launcher (torchrun starts
    each rank in its own session, so a launcher killed hard leaves them running); only processes
    whose command line is this run's ``craft_core.launch`` are touched."""
    for pid_file in launch_dir.glob("rank*.pid"):
        try:
            pid = int(pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError):
            continue
        if "craft_core.launch" in cmdline and str(args_path) in cmdline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def launch_train(cfg: TrainConfig, *, teacher: PolicySource, store_url: str | None, out_dir: Path,
                 progress: ProgressFn | None = None, anchor_dataset: DatasetSource | None = None,
                 poll_s: float = 2.0) -> dict:
    """Train with ``cfg.num_processes`` processes through torchrun; returns rank 0's result (result.json)."""
    check_processes_fit(cfg)
    out_dir = Path(out_dir).absolute()
    launch_dir = out_dir / LAUNCH_DIR
    launch_dir.mkdir(parents=True, exist_ok=True)
    args_path = launch_dir / "args.json"
    args_path.write_text(json.dumps({
        "cfg": cfg.model_dump(mode="json"), "teacher": teacher.model_dump(mode="json"), "store_url": store_url,
        "out_dir": str(out_dir), "anchor_dataset": anchor_dataset.model_dump(mode="json") if anchor_dataset else None,
    }, indent=2))
    _stop_orphaned_ranks(launch_dir, args_path)
    for stale in [out_dir / "result.json", *launch_dir.glob("result.rank*.json"), *launch_dir.glob("rank*.pid")]:
        stale.unlink(missing_ok=True)  # only this launch's results count
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    log_path = launch_dir / "torchrun.log"
    cmd = launcher_command(cfg, args_path)
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        # Its own process group, so the launcher and every rank are stopped together if this stage is.
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    (launch_dir / "torchrun.pid").write_text(str(proc.pid))
    seen = 0
    try:
        while proc.poll() is None:
            time.sleep(poll_s)
            seen = _report_progress(out_dir / "metrics.jsonl", cfg.steps, progress, seen)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    _report_progress(out_dir / "metrics.jsonl", cfg.steps, progress, seen)
    # Rank 0 (on machine 0) writes result.json; another machine reports its first local rank's result.
    local = sorted(launch_dir.glob("result.rank*.json"), key=lambda p: int(p.stem.removeprefix("result.rank")))
    result_path = out_dir / "result.json" if cfg.machine_rank == 0 else (local[0] if local else launch_dir / "none")
    if proc.returncode != 0 or not result_path.is_file():
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(
            f"training with {cfg.num_processes} processes (torchrun) exited with code {proc.returncode}; "
            f"run the stage again to resume from the last checkpoint. Log {log_path}:\n{tail}"
        )
    return json.loads(result_path.read_text())


def main(argv: list[str] | None = None) -> int:
    """One rank of a launched run (started by torchrun, never by hand)."""
    from craft_core.train import train

    argv = sys.argv[1:] if argv is None else argv
    args = json.loads(Path(argv[0]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    # torchrun starts every rank in its own session: the pid lets an operator (or a test) stop a rank.
    (Path(args["out_dir"]) / LAUNCH_DIR / f"rank{rank}.pid").write_text(str(os.getpid()))
    anchor_dataset = DatasetSource.model_validate(args["anchor_dataset"]) if args["anchor_dataset"] else None
    result = train(TrainConfig.model_validate(args["cfg"]), teacher=PolicySource.model_validate(args["teacher"]),
                   store_url=args["store_url"], out_dir=Path(args["out_dir"]), anchor_dataset=anchor_dataset)
    (Path(args["out_dir"]) / LAUNCH_DIR / f"result.rank{rank}.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
