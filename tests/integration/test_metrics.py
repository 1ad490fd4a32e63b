"""The fleet's metrics, read back from the node's Prometheus endpoint, and their docs."""

import json
import os
import re
import signal
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import ray

from fd_ray_sync import metrics
from fd_ray_sync.config import FleetConfig
from fd_ray_sync.engine.reference import init_full_state_dict
from fd_ray_sync.engine.spec import preset
from fd_ray_sync.errors import RankFailed, StateError, WeightMismatchError
from fd_ray_sync.fleet import Fleet

DOCS = Path(__file__).resolve().parents[2] / "docs"
SAMPLE = re.compile(r"^(\w+)\{(.*)\} (\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
SCRAPE_S = 60  # Ray exports a process's metrics every ~10 s (metrics_report_interval_ms)


def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample the node's metrics endpoint serves."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = []
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m:
            samples.append((m[1], dict(LABEL.findall(m[2])), float(m[3])))
    return samples


def values(samples, name: str, fleet: str, key: str) -> dict[str, float]:
    """`name`'s samples of `fleet`, summed over Ray's labels (worker, node), by tag `key`."""
    out: dict[str, float] = {}
    for n, labels, value in samples:
        if n == name and labels.get("fleet") == fleet:
            out[labels[key]] = out.get(labels[key], 0.0) + value
    return out


@pytest.mark.slow
def test_every_metric_reads_back_from_the_nodes_endpoint(ray_cluster):
    name = f"test-metrics-{uuid.uuid4().hex[:8]}"
    fleet = Fleet.launch(FleetConfig(name=name, tp=2, dp=1))
    try:
        state = init_full_state_dict(preset("tiny"), seed=1)
        model_bytes = sum(a.nbytes for a in state.values())
        fleet.update(state, version=1)
        bad = dict(state)
        bad["lm_head.weight"] = bad["lm_head.weight"][:, :100]
        with pytest.raises(RankFailed) as err:
            fleet.update(bad, version=2)
        assert {type(e) for e in err.value.errors.values()} == {WeightMismatchError}
        assert fleet.generate(["The trainer "], 4)[0].version == "1"
        # A rank killed while idle: the next request rebuilds its replica (two rank restarts)
        # and restores version 1 into it.
        os.kill(fleet.status()["ranks"][1]["pid"], signal.SIGKILL)
        assert fleet.generate(["fleet"], 4)[0].version == "1"
        fleet.clear()
        with pytest.raises(StateError, match="not serving"):
            fleet.generate(["x"], 4)
        # Read while the coordinator lives: it exports what it recorded every ~10 s.
        got = scrape_fleet(name)
    finally:
        fleet.shutdown()

    counts, sums = got["phase_count"], got["phase_sum"]
    assert all(sums[p] > 0 for p in PHASES), sums
    # Two updates prepared; the refused one stopped there, the other ran every phase.
    assert counts["prepare"] == 2 and counts["commit"] == 1 and counts["restore"] == 1
    assert got["bytes"] == {"object_store": model_bytes}
    assert got["version"] == {"0": 1.0}
    assert got["commits"] == {"0": 2.0}  # the update, then the restore after the rebuild
    assert got["aborts"] == {"WeightMismatchError": 1.0}
    # Both ranks of the rebuilt replica, twice more when its world formed at the second try
    # (a killed rank can still answer the first setup call and die in it).
    assert set(got["restarts"]) == {"0"} and got["restarts"]["0"] in (2.0, 4.0, 6.0)
    # Served: the two answered. Paused: each time a request met a closed gate: the one sent
    # while the killed rank's replica was repaired (at least once), the one after clear.
    assert got["requests"]["served"] == 2.0 and got["requests"]["paused"] >= 2.0
    assert "failed" not in got["requests"]  # no engine call raised


PHASES = {"prepare", "pause", "restart", "load", "verify", "commit", "restore"}


def scrape_fleet(fleet: str) -> dict[str, dict[str, float]]:
    """Every metric of `fleet`, polled from the (one) node's endpoint until the last record
    of the test (the request turned away after clear) is there."""
    (node,) = [n for n in ray.nodes() if n["Alive"]]
    deadline = time.monotonic() + SCRAPE_S
    while True:
        samples = scrape(node["MetricsExportPort"])
        got = {
            "phase_count": values(samples, "ray_fd_ray_sync_phase_seconds_count", fleet, "phase"),
            "phase_sum": values(samples, "ray_fd_ray_sync_phase_seconds_sum", fleet, "phase"),
            "bytes": values(samples, "ray_fd_ray_sync_update_bytes_total", fleet, "transport"),
            "version": values(samples, "ray_fd_ray_sync_committed_version", fleet, "replica"),
            "commits": values(samples, "ray_fd_ray_sync_commits_total", fleet, "replica"),
            "aborts": values(samples, "ray_fd_ray_sync_aborts_total", fleet, "cause"),
            "restarts": values(samples, "ray_fd_ray_sync_rank_restarts_total", fleet, "replica"),
            "requests": values(samples, "ray_fd_ray_sync_requests_total", fleet, "outcome"),
        }
        if PHASES <= set(got["phase_count"]) and got["requests"].get("paused", 0) >= 2:
            return got
        assert time.monotonic() < deadline, f"metrics missing after {SCRAPE_S}s: {got}"
        time.sleep(1)


def test_version_numbers_and_abort_causes():
    assert metrics.version_number("12") == 12.0
    assert metrics.version_number("3.5") == 3.5
    assert metrics.version_number("step-12") is None
    assert metrics.version_number("nan") is None
    refused = RankFailed(
        "prepare",
        {0: "shape", 1: "shape"},
        {0: WeightMismatchError("a")} | {1: WeightMismatchError("b")},
    )
    assert metrics.abort_cause(refused) == "WeightMismatchError"
    mixed = RankFailed("load", {0: "died", 1: "shape"}, {1: WeightMismatchError("b")}, lost=[0])
    assert metrics.abort_cause(mixed) == "RankFailed"
    assert metrics.abort_cause(StateError("x")) == "StateError"


def test_the_docs_list_every_metric_and_the_dashboard_plots_each():
    doc = (DOCS / "observability.md").read_text(encoding="utf-8")
    with open(DOCS / "grafana-fd-ray-sync.json", encoding="utf-8") as f:
        dashboard = json.load(f)
    queries = " ".join(
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    )
    for key, (_, tags, _) in metrics.METRICS.items():
        assert f"`{metrics.PREFIX}{key}`" in doc, key
        assert all(f"`{tag}`" in doc for tag in tags), key
        assert f"ray_{metrics.PREFIX}{key}" in queries, key
