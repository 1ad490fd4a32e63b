"""The fleet's metrics, defined once, recorded through Ray's metrics API.

Every metric is a `ray.util.metrics` Counter, Gauge or Histogram named `fd_ray_sync_*`;
Ray exports it from the node of the process that records it (the coordinator; a replica's
front for requests), on that node's Prometheus endpoint, as `ray_fd_ray_sync_*` (see
docs/observability.md). Ray metrics only exist inside a process connected to Ray, so the
metric objects are created on the first record in that process, not at import.

The recording functions are what the actors call: each is a few dictionary lookups, and
none raises: a metric that cannot be recorded is logged once and the update goes on.

    phase      fd_ray_sync_phase_seconds         Histogram  fleet, phase
    bytes      fd_ray_sync_update_bytes          Counter    fleet, transport
    version    fd_ray_sync_committed_version     Gauge      fleet, replica
               fd_ray_sync_commits               Counter    fleet, replica
    aborts     fd_ray_sync_aborts                Counter    fleet, cause
    restarts   fd_ray_sync_rank_restarts         Counter    fleet, replica
    requests   fd_ray_sync_requests              Counter    fleet, outcome
"""

from __future__ import annotations

import math
from typing import Any

from fd_ray_sync.log import get_logger

log = get_logger(__name__, "metrics")

PREFIX = "fd_ray_sync_"

# Seconds, from a bucket write on a tiny model to a large model over a slow network.
PHASE_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]

REQUEST_OUTCOMES = ("served", "failed", "paused")

# name -> (kind, tag keys, description); the one list of what is exported.
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "phase_seconds": (
        "histogram",
        ("fleet", "phase"),
        "Seconds each phase of an update took on every rank (prepare, pause, clear, "
        "restart, load, verify, commit), and a replica's whole restore (restore).",
    ),
    "update_bytes": (
        "counter",
        ("fleet", "transport"),
        "Bytes of committed updates, by the transport that moved them.",
    ),
    "committed_version": (
        "gauge",
        ("fleet", "replica"),
        "The version a replica serves, where the version string is a number.",
    ),
    "commits": (
        "counter",
        ("fleet", "replica"),
        "Commits of a version into a replica (updates and restores), whatever the version.",
    ),
    "aborts": (
        "counter",
        ("fleet", "cause"),
        "Updates aborted, by the class of the error that aborted them.",
    ),
    "rank_restarts": (
        "counter",
        ("fleet", "replica"),
        "Rank processes restarted when their replica was rebuilt.",
    ),
    "requests": (
        "counter",
        ("fleet", "outcome"),
        "Generation requests at the replicas' fronts: served, failed, or paused (met a "
        "closed gate).",
    ),
}

# The metric objects of this process, created on first use (a registry, like the sources').
_made: dict[str, Any] = {}
_warned: set[str] = set()


def _metric(key: str):
    metric = _made.get(key)
    if metric is None:
        from ray.util import metrics

        kind, tags, description = METRICS[key]
        name = PREFIX + key
        if kind == "histogram":
            metric = metrics.Histogram(name, description, PHASE_BOUNDARIES, tag_keys=tags)
        elif kind == "gauge":
            metric = metrics.Gauge(name, description, tag_keys=tags)
        else:
            metric = metrics.Counter(name, description, tag_keys=tags)
        _made[key] = metric
    return metric


def _record(key: str, method: str, value: float, tags: dict[str, str]) -> None:
    try:
        getattr(_metric(key), method)(value, tags=tags)
    except Exception as e:  # noqa: BLE001 - a metric never breaks an update
        if key not in _warned:
            _warned.add(key)
            log.warning("cannot record metric %s%s: %s: %s", PREFIX, key, type(e).__name__, e)


def phase_seconds(fleet: str, phase: str, seconds: float) -> None:
    _record("phase_seconds", "observe", max(seconds, 0.0), {"fleet": fleet, "phase": phase})


def update_bytes(fleet: str, transport: str, nbytes: int) -> None:
    if nbytes > 0:  # a Counter refuses 0
        _record("update_bytes", "inc", nbytes, {"fleet": fleet, "transport": transport})


def version_number(version: str) -> float | None:
    """`version` as a number when it reads as one ("12", "3.5"), else None."""
    try:
        number = float(version)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def committed_version(fleet: str, replica: int, version: str) -> None:
    """A replica committed `version`: the commit counter always moves; the version gauge
    is set only where the version is a number (a string version has no value to plot)."""
    tags = {"fleet": fleet, "replica": str(replica)}
    _record("commits", "inc", 1, tags)
    number = version_number(version)
    if number is not None:
        _record("committed_version", "set", number, tags)


def abort_cause(error: BaseException) -> str:
    """The class name of what aborted an update. A `RankFailed` whose ranks all raised the
    same class is counted under that class (a refused shape: WeightMismatchError);
    otherwise under its own (RankFailed, PhaseTimeout)."""
    errors = getattr(error, "errors", None)
    if isinstance(errors, dict) and errors and not getattr(error, "lost", None):
        classes = {type(e).__name__ for e in errors.values()}
        if len(classes) == 1:
            return classes.pop()
    return type(error).__name__


def abort(fleet: str, cause: str) -> None:
    _record("aborts", "inc", 1, {"fleet": fleet, "cause": cause})


def rank_restart(fleet: str, replica: int, ranks: int = 1) -> None:
    _record("rank_restarts", "inc", ranks, {"fleet": fleet, "replica": str(replica)})


def requests(fleet: str, outcome: str, count: int = 1) -> None:
    if outcome not in REQUEST_OUTCOMES:
        raise ValueError(f"outcome must be one of {REQUEST_OUTCOMES}, not {outcome!r}")
    _record("requests", "inc", count, {"fleet": fleet, "outcome": outcome})
