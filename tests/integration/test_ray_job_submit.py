"""examples/rlhf_loop.py as a `ray job submit` job on a real head started with `ray start`.

Token authentication is on for both, as DESIGN.md requires. The head is isolated from any
other Ray on the machine: its own ports, its own --temp-dir, and its own token
(RAY_AUTH_TOKEN_PATH, so ~/.ray/auth_token is neither read nor written). It runs under
`ray start --block` in a session of its own, so stopping it is ending that process and
what is left of its session, never `ray stop`, which would stop every Ray node of this user.
Its fixture disconnects the test session from its Ray instance, so conftest.py runs this
file after every other test.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from procs import free_ports

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "rlhf_loop.py"
START_TIMEOUT_S = 60
JOB_TIMEOUT_S = 150
STOP_TIMEOUT_S = 30


def _ray_cli() -> str:
    """The `ray` script next to this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).with_name("ray")
    found = str(beside) if beside.exists() else shutil.which("ray")
    if found is None:
        pytest.fail("no `ray` command next to this python or on PATH")
    return found


def _run(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


class Head:
    """A `ray start --head --block` process and how to reach its dashboard."""

    def __init__(self, proc: subprocess.Popen, address: str, env: dict, log: Path):
        self.proc, self.address, self.env, self.log = proc, address, env, log

    def ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return _run([_ray_cli(), *args], self.env, timeout)

    def stop(self) -> None:
        """SIGTERM the head (it shuts its own processes down), then kill what is left.

        The head was started in a new session, so what is left is whatever still belongs
        to that session: Ray's daemons and workers inherit it. (A job's driver runs in a
        session of its own; the test stops a job it gave up on with `ray job stop`.)
        """
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)
        deadline = time.monotonic() + 10
        while _session_pids(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in _session_pids(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _session_pids(sid: int) -> list[int]:
    """Processes of session `sid` (Linux /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    # A driver left connected by another test in this process must not see this cluster
    # (nor this cluster's job see it); this test itself never calls ray.init.
    if ray.is_initialized():
        ray.shutdown()
    # Short: Ray's socket paths live under it and must fit in 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="fdrs-", dir="/tmp"))
    token = temp_dir / "auth_token"
    token.write_text(secrets.token_hex(32), encoding="utf-8")
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    (gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env, node_manager,
     object_manager) = free_ports(9)  # fmt: skip
    log = temp_dir / "ray_start.log"
    command = [
        _ray_cli(), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}", f"--node-manager-port={node_manager}",
        f"--object-manager-port={object_manager}",
        "--num-cpus=4", "--num-gpus=0", f"--temp-dir={temp_dir}",
    ]  # fmt: skip
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    h = Head(proc, f"http://127.0.0.1:{dashboard}", env, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text()}")
            if h.ray("job", "list", "--address", h.address, timeout=30).returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the dashboard did not answer in {START_TIMEOUT_S}s:\n{log.read_text()}"
                )
            time.sleep(1)
        yield h
    finally:
        h.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_dashboard_refuses_jobs_without_the_token(head: Head) -> None:
    env = {k: v for k, v in head.env.items() if k != "RAY_AUTH_TOKEN_PATH"}
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # a token, but not this cluster's
    result = _run([_ray_cli(), "job", "list", "--address", head.address], env, 30)
    assert result.returncode != 0, result.stdout
    assert re.search(r"authenticat|token", result.stdout + result.stderr, re.I), result.stderr


def test_rlhf_loop_runs_as_a_job(head: Head) -> None:
    job_id = f"rlhf-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    try:
        submit = head.ray(
            "job", "submit", "--log-color", "false", "--address", head.address,
            "--submission-id", job_id,
            "--", sys.executable, str(EXAMPLE), "--steps", "2", "--transport", "ipc",
            timeout=JOB_TIMEOUT_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        head.ray("job", "stop", "--address", head.address, job_id)
        logs = head.ray("job", "logs", "--address", head.address, job_id).stdout
        pytest.fail(f"job {job_id} did not finish in {JOB_TIMEOUT_S}s; logs:\n{logs[-6000:]}")
    elapsed = time.monotonic() - started
    status = head.ray("job", "status", "--log-color", "false", "--address", head.address, job_id)
    logs = head.ray("job", "logs", "--address", head.address, job_id).stdout
    context = f"submit rc={submit.returncode}\n{submit.stderr[-3000:]}\nlogs:\n{logs[-6000:]}"
    # `ray job status` ends with "Job '<id>' succeeded" (or failed/stopped).
    assert re.search(rf"Job '{job_id}' succeeded", status.stdout), status.stdout + context
    assert submit.returncode == 0, context
    for step in (1, 2):
        line = re.search(
            rf"^step {step}: reward [\d.]+ .*version {step} update [\d.]+s", logs, re.M
        )
        assert line, f"no line for step {step}\n{context}"
    assert re.search(r"^final: reward [\d.]+ version 2\b", logs, re.M), context
    assert "rlhf loop done" in logs, context
    print(f"job {job_id} finished in {elapsed:.1f}s")
