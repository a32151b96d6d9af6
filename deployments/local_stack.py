"""A private local Prefect stack: server, process work pool, deployment `craft/full`, worker.

For users:

    python deployments/local_stack.py                 # server on 127.0.0.1:4200 + pool + deploy + worker
    # then, in another shell (the script prints these lines):
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    prefect deployment run craft/full --params "$(python flows/craft_flow.py --preset smoke --print-params)" --watch
    # UI: http://127.0.0.1:4200

Ctrl-C (SIGINT), SIGTERM and SIGHUP stop everything it started, at any point (also while it is
still starting), within 10 s. Tests and benchmarks use ``LocalPrefect`` the same way with a free
port and a private ``PREFECT_HOME`` (two processes sharing one SQLite home collide).

Every process is started in its own session and stopped by its process group: SIGTERM, then
SIGKILL after a grace period (an idle worker may ignore SIGTERM for a long time).
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
PREFECT_FILE = REPO_ROOT / "deployments" / "prefect.yaml"
DEFAULT_POOL = "craft-local"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalPrefect:
    """Start/stop a Prefect server (+ optionally pool, deployment, worker) owned by this object."""

    def __init__(self, home: str | Path, *, port: int | None = None, pool: str = DEFAULT_POOL,
                 extra_env: dict[str, str] | None = None, log_dir: str | Path | None = None):
        self.home = Path(home).absolute()
        self.port = port or free_port()
        self.pool = pool
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.ui_url = f"http://127.0.0.1:{self.port}"
        self.log_dir = Path(log_dir or self.home / "logs")
        self.processes: dict[str, subprocess.Popen] = {}
        self.announce = False  # print each started process (the script does; tests read it)
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_WORKER_PREFETCH_SECONDS": "2",
            "PYTHONUNBUFFERED": "1",
            **(extra_env or {}),
        }

    # -- processes ---------------------------------------------------------------------------

    def prefect(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a short ``prefect`` CLI command against this server (from the repo root)."""
        result = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=REPO_ROOT, env=self.env,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"prefect {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")
        process = subprocess.Popen([sys.executable, "-m", "prefect", *args], cwd=REPO_ROOT, env=self.env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.processes[name] = process
        if self.announce:
            print(f"started {name} (pid {process.pid})", flush=True)
        return process

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_server(self, timeout: float = 120) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        server = self._spawn("server", "server", "start", "--host", "127.0.0.1", "--port", str(self.port),
                             "--analytics-off")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"prefect server exited with {server.returncode}:\n{self.log('server')[-4000:]}")
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"prefect server not healthy after {timeout} s:\n{self.log('server')[-4000:]}")

    def deploy(self, name: str = "full") -> None:
        self.prefect("work-pool", "create", self.pool, "--type", "process", "--overwrite")
        self.prefect("deploy", "--prefect-file", str(PREFECT_FILE), "--name", name, "--pool", self.pool,
                     "--no-prompt")

    def start_worker(self, name: str = "worker") -> subprocess.Popen:
        """A process worker on the pool; several, with distinct names, serve it side by side."""
        return self._spawn(name, "worker", "start", "--pool", self.pool, "--type", "process", "--name", f"craft-{name}")

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM every process group we started (worker first), SIGKILL what outlives the grace."""
        for name in reversed(list(self.processes)):
            process = self.processes[name]
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        for name in reversed(list(self.processes)):
            process = self.processes[name]
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:  # the group may hold children (flow-run processes) even after the leader exited
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
        self.processes.clear()

    def __enter__(self) -> "LocalPrefect":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- API ---------------------------------------------------------------------------------

    def api(self, method: str, path: str, **kwargs):
        response = httpx.request(method, f"{self.api_url}{path}", timeout=30, **kwargs)
        response.raise_for_status()
        return response.json()

    def run_deployment(self, params: dict, name: str = "craft/full") -> str:
        """``prefect deployment run`` as a user types it; returns the flow run id."""
        result = self.prefect("deployment", "run", name, "--params", json.dumps(params))
        for line in result.stdout.splitlines():
            if "UUID:" in line:
                return line.split("UUID:", 1)[1].strip()
        raise RuntimeError(f"no flow run id in `prefect deployment run` output:\n{result.stdout}")

    def wait_flow_run(self, flow_run_id: str, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.api("GET", f"/flow_runs/{flow_run_id}")
            if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return run
            time.sleep(1)
        raise TimeoutError(f"flow run {flow_run_id} not finished after {timeout} s (worker log:\n"
                           f"{self.log('worker')[-4000:]})")

    def task_runs(self, flow_run_id: str) -> dict[str, dict]:
        runs = self.api("POST", "/task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run_id]}}})
        return {run["name"]: run for run in runs}

    def latest_artifact(self, key: str) -> dict:
        return self.api("GET", f"/artifacts/{key}/latest")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STOP_GRACE_S = 6.0  # SIGTERM to SIGKILL; with the script's own exit, everything is gone within 10 s


class StopRequested(KeyboardInterrupt):
    """SIGTERM or SIGHUP, handled like Ctrl-C: unwind and stop every process started."""


def _request_stop(signum, frame) -> None:
    raise StopRequested(signal.Signals(signum).name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=4200)
    parser.add_argument("--home", default=str(Path.home() / ".prefect-craft"),
                        help="PREFECT_HOME of this server (its SQLite DB and results)")
    parser.add_argument("--pool", default=DEFAULT_POOL)
    args = parser.parse_args()
    for signum in STOP_SIGNALS:
        signal.signal(signum, _request_stop)
    stack = LocalPrefect(args.home, port=args.port, pool=args.pool)
    stack.announce = True
    try:
        stack.start_server()
        stack.deploy()
        stack.deploy("extract-shard")  # cache.shard_runner=deployment runs each shard as a run of it
        stack.start_worker()
        print(f"Prefect UI:  {stack.ui_url}")
        print(f"export PREFECT_API_URL={stack.api_url}")
        print('prefect deployment run craft/full --params "$(python flows/craft_flow.py --preset smoke '
              '--print-params)" --watch')
        print(f"logs: {stack.log_dir}; Ctrl-C stops the server and the worker")
        while all(p.poll() is None for p in stack.processes.values()):
            time.sleep(1)
        print("a process exited; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM/SIGHUP (StopRequested)
        print(f"{stop or 'SIGINT'}: stopping the server and the worker", file=sys.stderr, flush=True)
        return 0
    finally:
        for signum in STOP_SIGNALS:  # a second signal must not cut the clean-up short
            signal.signal(signum, signal.SIG_IGN)
        stack.stop(grace_s=STOP_GRACE_S)


if __name__ == "__main__":
    sys.exit(main())
