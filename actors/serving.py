"""Serving a fleet: generation on one replica at a time, and what the fleet reports.

`ServingMixin` picks a serving replica in turn for each request (rebuilding one that lost
a rank), answers `status` and `rank_handles` in their own concurrency group (so they answer
while an update runs), and clears the fleet. It lives apart from placement and the update
transaction; all three run on the one `CoordinatorActor` and share its state (see its
`__init__`).
"""

from __future__ import annotations

import ray

from fd_ray_sync import metrics
from fd_ray_sync.errors import RankFailed, StateError, VerificationError
from fd_ray_sync.messages import GenerationResult


class ServingMixin:
    """Generation, status and clearing of a fleet (part of CoordinatorActor)."""

    def clear(self) -> None:
        """Free every rank's weights and KV cache; the fleet stops serving until an update."""
        self._cleared = True
        self._ok = [False] * self.config.dp
        self._phase("clear", lambda a: a.clear.remote())

    def generate(
        self, prompts: list[str], max_new_tokens: int, replica: int | None = None
    ) -> list[GenerationResult]:
        """Run on every TP rank of one replica at once; results carry their version.

        A replica with a rank Ray restarted (or that dies during the request) is rebuilt,
        loading the committed version, and the request runs there again (or once more).
        Each call counts once in `fd_ray_sync_requests`, served or failed. (None counts as
        paused yet: a request that arrives during an update waits for it, refused by no gate.)
        """
        try:
            results = self._generate(prompts, max_new_tokens, replica)
        except Exception:
            metrics.requests(self.config.name, "failed")
            raise
        metrics.requests(self.config.name, "served")
        return results

    def _generate(
        self, prompts: list[str], max_new_tokens: int, replica: int | None
    ) -> list[GenerationResult]:
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
            "phase": self._running_phase,  # the update's phase running now, if any
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
