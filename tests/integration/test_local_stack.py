"""deployments/local_stack.py stops everything it started on SIGTERM, SIGINT and SIGHUP.

The script runs as a user starts it (its own session, so the signal reaches only the script, the
way ``kill <pid>`` or a closing terminal's SIGHUP does). SIGTERM is sent once the whole stack is up
(server, pool, deployment, worker); SIGINT and SIGHUP while it is still starting (the server is up,
the deployment is being registered). Afterwards no process of any group it started may be left,
and the server's port must be closed.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deployments.local_stack import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

# The script's own bound is 10 s (6 s SIGTERM grace, then SIGKILL); the wait below only keeps a
# starved CI machine from failing on the interpreter's own exit.
EXIT_WAIT_S = 30


def _read_until(process: subprocess.Popen, marker: str, timeout: float) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            if process.poll() is not None:
                break
            continue
        lines.append(line.rstrip())
        if marker in line:
            return lines
    raise AssertionError(f"no {marker!r} within {timeout} s; output so far:\n" + "\n".join(lines))


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _group_alive(pgid: int) -> bool:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("signum, when", [
    (signal.SIGTERM, "Prefect UI:"),  # everything started, worker included
    (signal.SIGINT, "started server"),  # still starting
    (signal.SIGHUP, "started server"),
])
def test_signal_stops_everything_it_started(tmp_path, signum, when):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PREFECT_API_URL", None)
    script = subprocess.Popen(
        [sys.executable, "deployments/local_stack.py", "--port", str(port), "--home", str(tmp_path / "prefect")],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        lines = _read_until(script, when, timeout=600)
        if when == "started server":  # wait until it serves, then interrupt the deployment step
            deadline = time.monotonic() + 300
            while not _port_open(port) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert _port_open(port), "the server never came up"
        started = {line.split()[1]: int(line.split("pid ")[1].rstrip(")")) for line in lines
                   if line.startswith("started ")}
        assert "server" in started and (when != "Prefect UI:" or "worker" in started), lines
        script.send_signal(signum)
        script.wait(timeout=EXIT_WAIT_S)
        rest = script.stdout.read()
        assert script.returncode == 0, rest
        assert signal.Signals(signum).name in rest, rest
        left = {name: pid for name, pid in started.items() if _alive(pid) or _group_alive(pid)}
        assert not left, f"still running after {signal.Signals(signum).name}: {left}"
        assert not _port_open(port), f"port {port} still served"
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
            script.wait()
