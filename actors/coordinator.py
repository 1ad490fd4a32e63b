"""CoordinatorActor: a named actor that owns a fleet's ranks and runs its transactions.

Every phase of an update is one round of remote calls on all ranks joined with a timeout,
so the join is the barrier; nothing polls. One writer at a time: the actor runs one method
at a time (status questions have their own concurrency group), so generation requests wait
for a running update to commit or abort and never see two versions.

Failures: any error, timeout or dead rank aborts the update on every rank. Replicas with a
dead or hung rank are rebuilt (their rank processes replaced, their world and groups
formed again) and load the committed version; replicas whose ranks wrote nothing resume,
the others roll back to it. Rank actors and the placement groups are named, so a restarted
coordinator finds them and rebuilds its state from what the ranks report.
"""

from __future__ import annotations

import logging
import threading

import ray

from actors.placement import PlacementMixin, rank_actor_name
from actors.transaction import TRAINER_POLL_S, TransactionMixin
from actors.weight_manager import EngineFactory
from fd_ray_sync.config import FEED_THREADS, FleetConfig
from fd_ray_sync.errors import (
    RankFailed,
    StateError,
    VerificationError,
)
from fd_ray_sync.feed import BucketFeed
from fd_ray_sync.log import get_logger
from fd_ray_sync.messages import (
    GenerationResult,
)
from fd_ray_sync.sources import TransportSpec

__all__ = ["TRAINER_POLL_S", "CoordinatorActor", "rank_actor_name"]


@ray.remote(num_cpus=0, max_restarts=-1, concurrency_groups={"status": 1, "feed": FEED_THREADS})
class CoordinatorActor(PlacementMixin, TransactionMixin):
    def __init__(self, config: FleetConfig, engine_factory: EngineFactory):
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        self.config = config
        self.log = get_logger(__name__, "coordinator")
        self._factory = engine_factory
        self.world = config.tp * config.dp
        self.ranks: list = []
        self.pgs: list = []  # one placement group per replica
        self.version: str | None = None
        # Where the committed version came from, kept until the next commit so an aborted
        # update (or a restarted rank) can load it again.
        self._committed: TransportSpec | None = None
        self._ok = [False] * config.dp  # replica -> serving the committed version
        self._cleared = False
        self._next_replica = 0
        self._nodes: dict[int, str] = {}  # rank -> the node it runs on
        self._pids: dict[int, int] = {}  # rank -> the process set up (a restart changes it)
        self._fingerprints: dict[int, str | None] = {}  # rank -> committed fingerprint
        self._down: dict[int, str] = {}  # replica -> why it does not serve
        self._feeds: dict[str, BucketFeed] = {}
        self._feeds_lock = threading.Lock()
        self._adopt()

    def clear(self) -> None:
        """Free every rank's weights and KV cache; the fleet stops serving until an update."""
        self._cleared = True
        self._ok = [False] * self.config.dp
        self._phase("clear", lambda a: a.clear.remote())

    # --- serving -------------------------------------------------------------------------

    def generate(
        self, prompts: list[str], max_new_tokens: int, replica: int | None = None
    ) -> list[GenerationResult]:
        """Run on every TP rank of one replica at once; results carry their version.

        A replica with a rank Ray restarted (or that dies during the request) is rebuilt,
        loading the committed version, and the request runs there again (or once more).
        """
        for attempt in (0, 1):
            chosen = self._pick_replica(replica)
            ranks = self._replica_ranks(chosen)
            if self._lost(ranks):
                self._rebuild_lost([chosen])
                chosen = self._pick_replica(replica)
                ranks = self._replica_ranks(chosen)
            try:
                out = self._phase(
                    "generate",
                    lambda a: a.generate.remote(prompts, max_new_tokens),
                    ranks,
                    fail_fast=True,
                )
            except RankFailed as e:
                if not e.lost or attempt:
                    raise
                try:
                    self._rebuild_replica(chosen)
                except Exception as e2:  # noqa: BLE001 - try another replica, if any serves
                    self._replica_down(chosen, e2)
                continue
            versions = {o["version"] for o in out.values()}
            if len(versions) != 1:
                raise VerificationError(f"replica {chosen} ranks answered from versions {versions}")
            first = out[ranks[0]]
            return [
                GenerationResult(prompt=p, text=t, version=first["version"], replica=chosen)
                for p, t in zip(prompts, first["texts"])
            ]
        raise AssertionError("unreachable")

    def _pick_replica(self, replica: int | None) -> int:
        serving = [r for r in range(self.config.dp) if self._ok[r]]
        if not serving:
            raise StateError(
                f"fleet {self.config.name} is not serving (version {self.version}): "
                + ("it was cleared; update it" if self._cleared else "update it first")
            )
        if replica is not None:
            if replica not in serving:
                raise StateError(f"replica {replica} is not serving; serving: {serving}")
            return replica
        choice = serving[self._next_replica % len(serving)]
        self._next_replica += 1
        return choice

    def shard_plans(self) -> dict[int, dict]:
        return self._phase("shard_plan", lambda a: a.shard_plan.remote())

    @ray.method(concurrency_group="status")
    def status(self) -> dict:
        ranks = []
        for rank, actor in enumerate(self.ranks):
            try:
                ranks.append(ray.get(actor.status.remote(), timeout=10))
            except Exception as e:  # noqa: BLE001 - a dead rank is part of the answer
                ranks.append({"rank": rank, "error": f"{type(e).__name__}"})
        # A rank Ray restarted since it was set up holds nothing: its replica does not serve
        # until the next request or update rebuilds it.
        serving, down = list(self._ok), dict(self._down)
        for rank, st in enumerate(ranks):
            if st.get("pid") != self._pids.get(rank) or not st.get("set_up"):
                replica = rank // self.config.tp
                if serving[replica]:
                    down[replica] = f"rank {rank} is not the process set up (restarted or dead)"
                serving[replica] = False
        return {
            "name": self.config.name,
            "version": self.version,
            "serving": any(serving),
            "replicas_serving": serving,
            "replica_errors": down,
            "dp": self.config.dp,
            "tp": self.config.tp,
            "keep_committed": self.config.keep_committed,
            # What a trainer that connects needs to feed updates as this fleet expects.
            "trainer": self.config.model_dump(
                mode="json", include={"load", "pipelined", "buckets_in_flight"}
            ),
            "update": self._update_progress(),
            "ranks": ranks,
        }

    def _update_progress(self) -> dict | None:
        """The running pipelined update: buckets the trainer has put, and each rank wrote."""
        with self._feeds_lock:
            running = [f for f in self._feeds.values() if f.closed is None]
        if not running:
            return None
        return running[-1].progress()

    @ray.method(concurrency_group="status")
    def rank_handles(self) -> list:
        return list(self.ranks)
