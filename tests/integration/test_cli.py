"""Every verb of the `fd-ray-sync` command against the test session's Ray cluster, as a
user runs them: a detached fleet booted from a snapshot folder, updated, cleared, scaled out,
shown as a table, shut down; and the demo, its progress bars forced on."""

import json
import os
import subprocess
import sys

import pytest
import ray

from fd_ray_sync.checksum import fingerprint
from fd_ray_sync.config import ParallelConfig
from fd_ray_sync.engine.reference import init_full_state_dict
from fd_ray_sync.engine.spec import ModelConfig, full_shapes, preset, shard_plan
from fd_ray_sync.sharding import take_shard
from fd_ray_sync.sources.snapshot import write_snapshot

pytestmark = pytest.mark.slow
TINY: ModelConfig = preset("tiny")
NAME = "cli-fleet"


def run_cli(*args, timeout=180, progress=False) -> subprocess.CompletedProcess:
    """The command as a script runs it (stdout and stderr pipes); `progress`: bars forced on,
    on stderr, as wide as their labels."""
    address = ray.get_runtime_context().gcs_address
    env = {**os.environ, "FD_RAY_SYNC_PROGRESS": "1" if progress else "0", "COLUMNS": "200"}
    out = subprocess.run(
        [sys.executable, "-m", "fd_ray_sync.cli", *args, "--address", address],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def cli(*args, timeout=180):
    return run_cli(*args, timeout=timeout).stdout


def plan_for(tp_rank):
    return shard_plan(TINY, ParallelConfig(tp=2, enable_expert_parallel=True, rank=tp_rank))


def fingerprints(state):
    return {
        r: fingerprint((n, "float32", take_shard(a, plan_for(r)[n])) for n, a in state.items())
        for r in range(2)
    }


def test_launch_from_a_snapshot_update_clear_update_shutdown(ray_cluster, tmp_path):
    assert set(full_shapes(TINY)) == set(init_full_state_dict(TINY, 1))
    v1, v2 = init_full_state_dict(TINY, 21), init_full_state_dict(TINY, 22)
    write_snapshot(tmp_path / "v1", v1, plan_for, tp=2, version="1", part_bytes=1 << 20)
    write_snapshot(tmp_path / "v2", v2, plan_for, tp=2, version="2", part_bytes=1 << 20)
    fleet = ["--name", NAME]
    cli("launch", *fleet, "--snapshot", str(tmp_path / "v1"), "--phase-timeout", "60",
        "--shutdown-comm-groups-on-clear")  # fmt: skip
    try:
        status = json.loads(cli("status", *fleet, "--json"))
        assert status["version"] == "1" and status["serving"]  # booted from model_dir
        got = {r["rank"]: r["fingerprint"] for r in status["ranks"]}
        assert got == fingerprints(v1)
        out = run_cli("update", *fleet, "--snapshot", str(tmp_path / "v2"), progress=True)
        report = json.loads(out.stdout)  # the bar stays on stderr
        assert report["version"] == "2"
        assert "version 2 committed" in out.stderr and "\x1b[" in out.stderr
        assert report["fingerprints"] == {str(r): f for r, f in fingerprints(v2).items()}
        assert "cleared" in cli("clear", *fleet)
        status = json.loads(cli("status", *fleet, "--json"))
        assert not status["serving"] and {r["weights"] for r in status["ranks"]} == {"CLEARED"}
        cli("update", *fleet, "--snapshot", str(tmp_path / "v2"), "--force")
        out = run_cli("scale", *fleet, "--dp", "2", progress=True)  # the new replica loads v2
        assert "scaled from dp=1 to dp=2; replicas serving: 0 1" in out.stdout
        assert "scaled to dp=2" in out.stderr
        table = cli("status", *fleet).splitlines()
        assert "version 2" in table[0] and "serving 2/2 replicas" in table[0], table
        rows = [line.split() for line in table if "NORMAL" in line]  # one per rank
        assert [row[0] for row in rows if row[1] == "yes"] == ["0", "1"], table  # replicas
        versions = [row[4] if row[1] == "yes" else row[2] for row in rows]
        assert versions == ["2"] * 4, table
    finally:
        assert "shut down" in cli("shutdown", *fleet)
    with pytest.raises(ValueError):
        ray.get_actor(NAME, namespace="fd_ray_sync")


def test_demo_runs_on_a_given_cluster():
    out = run_cli("demo", "--steps", "1", "--iters", "2", "--tokens", "4", timeout=300,
                  progress=True)  # fmt: skip
    assert "step  1/1" in out.stdout and "demo done" in out.stdout
    assert "2 versions pushed and sampled" in out.stderr and "update: version 1" in out.stderr
