"""A chaos run: updates while clients generate and ranks (and once the coordinator) are killed.

    fd-ray-sync chaos --updates 20 --dp 2 --tp 2

It runs on a local Ray cluster (it kills processes by pid), pushes `updates` versions of the
tiny reference model while client threads generate without pause, SIGKILLs a random rank
every few seconds and the coordinator once, then heals the fleet and counts what happened.
Two figures must be zero: results whose text is not what their version's weights produce
(a mixed or stale result), and ranks whose weights do not match the fleet's version.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable
from typing import Literal

import ray
from pydantic import BaseModel, ConfigDict, Field

from fd_ray_sync.checksum import fingerprint
from fd_ray_sync.config import FleetConfig, LoadConfig
from fd_ray_sync.engine.reference import ReferenceEngine, init_full_state_dict
from fd_ray_sync.engine.spec import preset
from fd_ray_sync.fleet import Fleet
from fd_ray_sync.sharding import take_shard
from fd_ray_sync.version import is_newer

PROMPT = "The trainer "

# (updates done, updates planned, what is happening): the command's progress bar.
OnProgress = Callable[[int, int, str], None]


def _no_progress(done: int, total: int, label: str) -> None:
    pass


class ChaosConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    updates: int = Field(20, ge=1, description="Versions to push.")
    dp: int = Field(2, ge=1)
    tp: int = Field(2, ge=1)
    clients: int = Field(2, ge=1, description="Threads generating without pause.")
    kill_interval_s: float = Field(6.0, gt=0, description="Mean seconds between rank kills.")
    step_s: float = Field(1.0, ge=0, description="Seconds between updates (the training step).")
    kill_coordinator: bool = Field(True, description="Kill the coordinator once, mid-run.")
    phase_timeout_s: float = Field(30.0, gt=0)
    tokens: int = Field(8, ge=1)
    seed: int = 0
    transport: Literal["object_store", "collective", "ipc"] = Field(
        "object_store", description="How updates reach the ranks (LoadConfig.load_strategy)."
    )


class ChaosReport(BaseModel):
    updates_tried: int = 0
    updates_committed: int = 0
    updates_aborted: int = 0
    ranks_killed: int = 0
    ranks_recovered: int = Field(
        0, description="Killed ranks found at the end as a new process holding the final version."
    )
    coordinator_killed: int = 0
    coordinator_killed_at_s: float | None = Field(
        None, description="Second of the run the coordinator was killed at."
    )
    coordinator_recovered: int = Field(
        0,
        description="1 when, after the kill, a new coordinator answered with the version "
        "last committed before it.",
    )
    requests_served: int = 0
    requests_failed: int = 0
    request_errors: dict[str, int] = Field(
        default_factory=dict, description="Failed requests by the exception's type."
    )
    request_error_examples: dict[str, str] = Field(
        default_factory=dict,
        description="The first message of each type in request_errors, with the run's second.",
    )
    mixed_version_results: int = 0
    params_not_matching_committed: int = 0
    final_version: str | None = None
    final_ranks: list[dict] = Field(default_factory=list, description="Each rank at the end.")
    seconds: float = 0.0


class _Run:
    def __init__(self, cfg: ChaosConfig, fleet: Fleet, on_progress: OnProgress = _no_progress):
        self.cfg, self.fleet = cfg, fleet
        self.on_progress = on_progress
        self.report = ChaosReport()
        self.rng = random.Random(cfg.seed)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.model = preset("tiny")
        self.reference = ReferenceEngine(self.model)  # single process: what each version says
        self.states: dict[str, dict] = {}
        self.texts: dict[str, str] = {}
        self.killed: list[tuple[int, int]] = []  # (rank, pid) of each rank killed
        self.committed: str | None = None  # the last version an update returned for
        self.committed_at_coordinator_kill: str | None = None
        self.started = time.monotonic()  # run() sets it again when the run starts

    def prepare(self, version: str) -> dict:
        """The weights of `version` and the text they must produce."""
        state = init_full_state_dict(self.model, seed=1000 + int(version))
        engine = self.reference
        engine.load_full_state_dict(state)
        with self.lock:
            self.states[version] = state
            self.texts[version] = engine.generate([PROMPT], self.cfg.tokens)[0]
        return state

    def client(self) -> None:
        while not self.stop.is_set():
            try:
                result = self.fleet.generate([PROMPT], self.cfg.tokens)[0]
            except Exception as e:  # noqa: BLE001 - counted: the figure is the point
                self._failed(e)
                time.sleep(0.2)
                continue
            with self.lock:
                self.report.requests_served += 1
                if self.texts.get(result.version) != result.text:
                    self.report.mixed_version_results += 1

    def _failed(self, e: Exception) -> None:
        kind = type(e).__name__
        with self.lock:
            r = self.report
            r.requests_failed += 1
            r.request_errors[kind] = r.request_errors.get(kind, 0) + 1
            if kind not in r.request_error_examples:
                at = time.monotonic() - self.started
                r.request_error_examples[kind] = f"at {at:.1f}s: {str(e)[:300]}"

    def kill_coordinator(self) -> None:
        with self.lock:
            self.committed_at_coordinator_kill = self.committed
        ray.kill(self.fleet.coordinator, no_restart=False)
        self.report.coordinator_killed += 1
        self.report.coordinator_killed_at_s = round(time.monotonic() - self.started, 1)

    def killer(self) -> None:
        # The first kill comes early, so even a short run kills at least one rank.
        wait = self.rng.uniform(0.2, 1.0) * self.cfg.kill_interval_s
        while not self.stop.wait(wait):
            try:
                ranks = self.fleet.status()["ranks"]
                rank, pid = self.rng.choice([(r["rank"], r["pid"]) for r in ranks if "pid" in r])
                os.kill(pid, signal.SIGKILL)
            except Exception:  # noqa: BLE001 - coordinator restarting, rank gone: try again
                wait = 0.5
                continue
            self.killed.append((rank, pid))
            self.report.ranks_killed += 1
            wait = self.rng.expovariate(1.0 / self.cfg.kill_interval_s)

    def wait_for_coordinator(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.fleet.status()
                return
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def run(self) -> ChaosReport:
        self.started = time.monotonic()
        self.fleet.update(self.prepare("0"), version=0)
        self.committed = "0"
        self.on_progress(0, self.cfg.updates, "version 0 committed; updates start")
        threads = [threading.Thread(target=self.client) for _ in range(self.cfg.clients)]
        threads.append(threading.Thread(target=self.killer))
        for t in threads:
            t.start()
        coordinator_at = self.rng.randint(1, self.cfg.updates) if self.cfg.kill_coordinator else 0
        try:
            for v in range(1, self.cfg.updates + 1):
                time.sleep(self.cfg.step_s)
                state = self.prepare(str(v))
                self.report.updates_tried += 1
                if v == coordinator_at:  # somewhere inside this update's phases
                    threading.Timer(self.rng.uniform(0, 0.05), self.kill_coordinator).start()
                try:
                    self.fleet.update(state, version=v)
                    self.report.updates_committed += 1
                    with self.lock:
                        self.committed = str(v)
                except Exception:  # noqa: BLE001 - an abort is an outcome, not a crash
                    self.report.updates_aborted += 1
                    self.wait_for_coordinator()
                self.on_progress(v, self.cfg.updates, self._tally())
            # A short run may end before the first kill landed (its status call can meet
            # the coordinator restarting): give the killer its chance, then heal.
            deadline = time.monotonic() + 2 * self.cfg.kill_interval_s + 30
            while not self.report.ranks_killed and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            self.stop.set()
            for t in threads:
                t.join(timeout=120)
        self.on_progress(self.cfg.updates, self.cfg.updates, "healing, then checking every rank")
        self.finish()
        self.report.seconds = time.monotonic() - self.started
        return self.report

    def _tally(self) -> str:
        r = self.report
        return (
            f"{r.updates_committed} committed, {r.updates_aborted} aborted, "
            f"{r.ranks_killed} ranks killed"
        )

    def finish(self) -> None:
        """Heal, then measure: every rank against the final version's weights, each killed
        rank as a new process, the coordinator as what it remembers."""
        self.wait_for_coordinator()
        ray.get(self.fleet.coordinator.heal.remote())
        status = self.fleet.status()
        version = status["version"]
        self.report.final_version = version
        if self.report.coordinator_killed:
            # A new coordinator that adopted the ranks knows the version committed before
            # the kill (or a later one, committed by an update after it).
            before = self.committed_at_coordinator_kill
            ok = version is not None and before is not None and not is_newer(before, version)
            self.report.coordinator_recovered = int(ok)
        plans = self.fleet.shard_plans()
        state = self.states[version]
        self.report.final_ranks = [
            {k: r.get(k) for k in ("rank", "pid", "weights", "version", "fingerprint", "error")}
            for r in status["ranks"]
        ]
        healthy = set()
        for r in status["ranks"]:
            want = fingerprint(
                (n, "float32", take_shard(a, plans[r["rank"]][n])) for n, a in state.items()
            )
            ok = r.get("weights") == "NORMAL" and r.get("version") == version
            if ok and r.get("fingerprint") == want:
                healthy.add(r["rank"])
            else:
                self.report.params_not_matching_committed += 1
        now = {r["rank"]: r.get("pid") for r in status["ranks"]}
        self.report.ranks_recovered = sum(
            1 for rank, pid in self.killed if rank in healthy and now[rank] != pid
        )


def run_chaos(cfg: ChaosConfig, on_progress: OnProgress = _no_progress) -> ChaosReport:
    """Run on the Ray instance this process is connected to (started locally if none);
    `on_progress(done, total, label)` hears of each update done."""
    on_progress(0, cfg.updates, "launching the fleet")
    if not ray.is_initialized():
        ray.init(num_cpus=2 * cfg.dp * cfg.tp, namespace="fd_ray_sync", log_to_driver=False)
    fleet = Fleet.launch(
        FleetConfig(
            name=f"chaos-{os.getpid()}-{cfg.seed}",
            dp=cfg.dp,
            tp=cfg.tp,
            phase_timeout_s=cfg.phase_timeout_s,
            load=LoadConfig(load_strategy=cfg.transport),
        )
    )
    try:
        return _Run(cfg, fleet, on_progress).run()
    finally:
        fleet.shutdown()
