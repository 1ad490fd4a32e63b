"""Serving a fleet: the replicas' fronts and gates, pausing, and what the fleet reports.

Requests do not pass through the coordinator: clients send them to each replica's front
(`actors/front.py`), which serves while its gate is open. `ServingMixin` keeps every front
told which ranks its replica has and whether it serves, closes gates before the coordinator
touches ranks (`_close_gates`) and opens them after (`_sync_fronts`), repairs a replica a
front reports broken, pauses and resumes serving as a user asks, answers `status` and
`rank_handles` in their own concurrency group (so they answer while an update runs), and
clears the fleet. It lives apart from placement and the update
transaction; all three run on the one `CoordinatorActor` and share its state (see its
`__init__`).
"""

from __future__ import annotations

import ray

from actors.front import ACTOR_GONE, check_pause_mode


class ServingMixin:
    """Generation, status and clearing of a fleet (part of CoordinatorActor)."""

    def clear(self, mode: str | None = None) -> None:
        """Free every rank's weights and KV cache; the fleet stops serving until an update.
        Requests in flight are drained as `mode` says (default: the fleet's pause mode)."""
        mode = check_pause_mode(mode or self.config.pause_mode)
        self._cleared = True
        self._ok = [False] * self.config.dp
        self._close_gates("down", "cleared: the fleet serves again after an update", mode)
        try:
            self._phase("clear", lambda a: a.clear.remote())
        finally:
            self._sync_fronts()

    # --- the fronts: each replica's gate (actors/front.py) --------------------------------

    @ray.method(concurrency_group="status")
    def fronts(self) -> list:
        """Each replica's front, in replica order: where clients send requests."""
        return list(self._fronts)

    def _front_down(self, replica: int) -> str | None:
        """Why `replica` does not serve (None: it serves), as its front should say."""
        if self._asleep:  # SleepMixin's: an update at sleep level 2 loads, yet serves not
            return self._describe()
        if self._ok[replica]:
            return None
        if replica in self._down:
            return self._down[replica]
        if self._cleared:
            return "cleared: the fleet serves again after an update"
        return "no version loaded yet: update the fleet" if self.version is None else "not serving"

    def _sync_fronts(self, replicas=None, reopen: tuple[str, ...] = ()) -> None:
        """Tell each front (of `replicas`, default all) its ranks and whether it serves;
        lift the `reopen` reasons. Waits for every front to take it: a caller that returns
        next has its fronts open (or closed) as it said."""
        replicas = range(self.config.dp) if replicas is None else replicas
        self._wait_fronts([self._tell(self._fronts[r], r, reopen) for r in replicas])

    def _tell(self, front, replica: int, reopen: tuple[str, ...] = ()):
        """`front.set_state` for `replica`: its ranks and whether it serves."""
        handles = [self.ranks[r] for r in self._replica_ranks(replica)]
        return front.set_state.remote(handles, self._front_down(replica), reopen)

    def _close_gates(self, reason: str, why: str, mode: str, replicas=None) -> None:
        """Close the fronts of `replicas` (default all) for `reason`; returns once no batch
        runs on their ranks (or a front's drain timed out: the phase that follows then
        meets the busy ranks and times out itself)."""
        replicas = range(self.config.dp) if replicas is None else replicas
        refs = [self._fronts[r].close.remote(reason, why, mode) for r in replicas]
        self._wait_fronts(refs)

    def _wait_fronts(self, refs: list) -> None:
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.config.phase_timeout_s)
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001 - a dead front is replaced on a client's miss
                self.log.warning("a front did not take its state: %s", e)

    def replace_front(self, replica: int) -> None:
        """A client found `replica`'s front gone (its process died; Ray does not restart
        fronts): start a new one there and tell it its state. Nothing when the front still
        answers (another client asked first) or the replica was scaled away."""
        if replica >= len(self._fronts):
            return
        try:
            ray.get(self._fronts[replica].__ray_ready__.remote(), timeout=10)
            return
        except ACTOR_GONE:
            pass
        except ray.exceptions.GetTimeoutError:
            return  # alive but busy: its name is still taken
        self.log.warning("replica %d's front is gone: starting a new one", replica)
        front = self._create_front(replica)
        self._wait_fronts([self._tell(front, replica)])
        if self._paused:
            why = f"paused ({self._paused})"
            self._wait_fronts([front.close.remote("pause", why, self._paused)])
        self._fronts[replica] = front  # clients find it once it knows its state

    def repair(self, replica: int, why: str) -> None:
        """A front lost a rank while serving: rebuild its replica if a rank is lost, then
        tell the front whether it serves."""
        if replica >= self.config.dp:
            return  # scaled away meanwhile
        self.log.warning("replica %d's front reports: %s", replica, why)
        ranks = self._replica_ranks(replica)
        if self._lost(ranks):
            self._rebuild_lost([replica])
        self._sync_fronts([replica], reopen=("repair",))

    # --- pausing, as a user asks (FastDeploy's /v1/pause) --------------------------------

    @ray.method(concurrency_group="status")
    def pause_serving(self, mode: str = "wait") -> dict:
        """Close every front until `resume` (requests wait at the gate or, in mode abort,
        those in flight are answered "aborted"; see actors/front.py). Updates still run."""
        check_pause_mode(mode)
        self._paused = mode
        refs = [f.close.remote("pause", f"paused ({mode})", mode) for f in self._fronts]
        self._wait_fronts(refs)
        return {"paused": True, "mode": mode}

    @ray.method(concurrency_group="status")
    def resume_serving(self) -> dict:
        self._paused = None
        self._wait_fronts([f.open.remote("pause") for f in self._fronts])
        return {"paused": False}

    @ray.method(concurrency_group="status")
    def is_paused(self) -> bool:
        return self._paused is not None

    def shard_plans(self) -> dict[int, dict]:
        return self._phase("shard_plan", lambda a: a.shard_plan.remote())

    def manifest(self) -> dict:
        """The engine's full names, shapes and dtypes (rank 0's: every rank has the same)."""
        return self._phase("manifest", lambda a: a.manifest.remote(), ranks=[0])[0]

    @ray.method(concurrency_group="status")
    def status(self) -> dict:
        ranks = _answers([a.status for a in self.ranks], "rank")
        gates = _answers([f.state for f in self._fronts], "replica")
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
            # Each replica's version, as its first rank reports it (rolling updates: the
            # replicas not yet loaded serve the previous one).
            "replica_versions": [
                ranks[r * self.config.tp].get("version") for r in range(self.config.dp)
            ],
            "dp": self.config.dp,
            "tp": self.config.tp,
            "keep_committed": self.config.keep_committed,
            # What a trainer that connects needs to feed updates as this fleet expects.
            "trainer": self.config.model_dump(
                mode="json",
                include={"load", "pipelined", "buckets_in_flight", "phase_timeout_s", "use_gpu"},
            ),
            "phase": self._running_phase,  # the update's phase running now, if any
            "update": self._update_progress(),
            "paused": self._paused,
            "gates": gates,
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

    @ray.method(concurrency_group="status")
    def placement_groups(self) -> list:
        return list(self.pgs)


def _answers(methods: list, key: str) -> list[dict]:
    """Each method's answer, asked all at once; one that fails (a dead rank or front) is
    part of the answer: {key: its index, "error": the exception's name}."""
    refs = [m.remote() for m in methods]
    out = []
    for i, ref in enumerate(refs):
        try:
            out.append(ray.get(ref, timeout=10))
        except Exception as e:  # noqa: BLE001
            out.append({key: i, "error": f"{type(e).__name__}"})
    return out
