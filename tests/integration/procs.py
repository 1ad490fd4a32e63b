"""Running a function as N real rank processes (spawned) that report through a queue."""

from __future__ import annotations

import multiprocessing as mp
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from queue import Empty

import ray

TIMEOUT_S = 120


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (all sockets held open until every port is taken)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _run(target: Callable, rank: int, endpoints: list[str], args: tuple, queue) -> None:
    try:
        queue.put({"rank": rank, **target(rank, endpoints, *args)})
    except BaseException:
        queue.put({"rank": rank, "error": traceback.format_exc()})


def run_ranks(target: Callable, world: int, *args) -> list[dict]:
    """Call `target(rank, endpoints, *args) -> dict` in `world` spawned processes.

    Returns the dicts sorted by rank; fails fast when a process dies without reporting and
    re-raises (as an assertion) any exception a rank hit.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    endpoints = [f"127.0.0.1:{port}" for port in free_ports(world)]
    procs = [
        ctx.Process(target=_run, args=(target, rank, endpoints, args, queue))
        for rank in range(world)
    ]
    for proc in procs:
        proc.start()
    results: list[dict] = []
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while len(results) < world:
            try:
                results.append(queue.get(timeout=1))
            except Empty:
                crashed = {p.pid: p.exitcode for p in procs if p.exitcode not in (None, 0)}
                assert not crashed, f"rank process(es) died without a report: {crashed}"
                assert time.monotonic() < deadline, f"no report from every rank in {TIMEOUT_S}s"
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
    errors = [r["error"] for r in results if "error" in r]
    assert not errors, "\n".join(errors)
    return sorted(results, key=lambda r: r["rank"])


def start_driver(tmp_path, source, ready):
    """Run `source` as another Ray driver of this cluster; return once it printed `ready`."""
    script = tmp_path / "driver.py"
    script.write_text(source)
    address = ray.get_runtime_context().gcs_address
    driver = subprocess.Popen(
        [sys.executable, str(script), address], stdout=subprocess.PIPE, text=True
    )
    line = driver.stdout.readline().strip()
    if line != ready:
        driver.kill()
        driver.wait()
        raise AssertionError(f"the driver printed {line!r}, not {ready!r}")
    return driver
