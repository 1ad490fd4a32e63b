"""Sleep and wake of a whole fleet: the coordinator's part (the semantics: fd_ray_sync.sleep).

`SleepMixin.sleep` runs on every rank at once (one phase) and the fleet stops serving while
anything sleeps; `wake_up` brings the tags back on every rank. After a level-1 sleep the
fleet serves the same version again, checked against each rank's fingerprint, with no push
from the trainer; after level 2 the weights are gone, as after `clear`: the next update loads
them (an RLHF loop's `sleep(2)`, update, `wake_up(["kv_cache"])`).

It comes first among CoordinatorActor's bases, so while the fleet sleeps it answers before
the other mixins do: every replica's front is closed ("down", naming wake_up), so requests
are turned away; an update is refused at level 1
(it would drop the weights kept in host memory) and loads them at level 2; `heal` and
`scale` wait for the wake (they would load weights into sleeping replicas; wake_up rebuilds
a replica that lost a rank meanwhile); `status` gains `asleep`. A restarted coordinator
learns the sleep from its ranks in `heal`, which its adoption runs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from types import MappingProxyType

import ray

from fd_ray_sync.errors import RankFailed, StateError
from fd_ray_sync.messages import UpdateReport
from fd_ray_sync.sleep import Tags, deepened, describe, sleep_level, sleep_tags
from fd_ray_sync.sources import TransportSpec


class SleepMixin:
    """Sleep and wake of every rank, and the guards that hold while asleep (part of
    CoordinatorActor)."""

    # Tag -> level of what sleeps (empty: awake); and which replicas served before the sleep,
    # with why the others did not (what a full wake gives back). Replaced, never changed in
    # place, so these class defaults are never shared state.
    _asleep: Mapping[str, int] = MappingProxyType({})
    _awake_ok: tuple[tuple[bool, ...], Mapping[int, str]] | None = None

    def sleep(self, level: int = 1, tags: Tags = None) -> dict:
        """Sleep `tags` ("weights", "kv_cache"; None: both) on every rank at `level` (1: the
        weights wait in each rank's host memory; 2: they are discarded). The fleet stops
        serving until `wake_up` (and, after level 2, an update)."""
        level, tags = sleep_level(level), sleep_tags(tags)
        if not self.ranks:
            raise StateError("the fleet has no ranks: call start() first")
        start = time.perf_counter()
        if not self._asleep:
            self._awake_ok = (tuple(self._ok), dict(self._down))
        # Recorded before the ranks sleep: if some fail, wake_up still knows to wake them all.
        self._asleep = deepened(self._asleep, level, tags)
        if self._asleep.get("weights") == 2:
            self._cleared = True  # discarded, as by clear: restores have nothing to load
        self._mark_asleep()
        # Requests in flight drain as the pause mode says; new ones are turned away.
        self._close_gates("down", self._describe(), self.config.pause_mode)
        try:
            self._phase("sleep", lambda a: a.sleep.remote(level, tags))
        finally:
            self._sync_fronts()
        seconds = time.perf_counter() - start
        self.log.info("fleet %s %s (%.3fs)", self.config.name, self._describe(), seconds)
        return {"asleep": dict(self._asleep), "seconds": seconds}

    def wake_up(self, tags: Tags = None) -> dict:
        """Wake `tags` (None: both) on every rank. Once nothing sleeps, replicas serve again
        as they did before the sleep (weights at level 2: after an update). A replica that
        lost a rank meanwhile, or whose rank cannot wake (its host copy fails the fingerprint
        check), is rebuilt on the committed version once the rest woke; a failed wake is
        raised after that."""
        tags = sleep_tags(tags)
        start = time.perf_counter()
        if not self._asleep:
            return {"asleep": {}, "seconds": 0.0}
        tp = self.config.tp
        bad = {r // tp for r in self._lost(range(self.world))}
        awake = [r for r in range(self.world) if r // tp not in bad]
        failed: RankFailed | None = None
        try:
            if awake:
                self._phase("wake_up", lambda a: a.wake_up.remote(tags), awake)
        except RankFailed as e:
            failed = e
            bad |= {r // tp for r in e.failures}
        self._asleep = {t: v for t, v in self._asleep.items() if t not in tags}
        if self._asleep:
            self._mark_asleep()
        else:
            self._serve_again(bad)
        self._sync_fronts()
        seconds = time.perf_counter() - start
        self.log.info("fleet %s woke %s (%.3fs)", self.config.name, ", ".join(tags), seconds)
        if failed is not None:
            raise failed
        return {"asleep": dict(self._asleep), "seconds": seconds}

    @ray.method(concurrency_group="status")
    def sleep_state(self) -> dict[str, int]:
        """Tag -> level of what sleeps; empty when awake."""
        return dict(self._asleep)

    def _describe(self) -> str:
        return describe(self._asleep, discarded=self._cleared)

    def _mark_asleep(self) -> None:
        self._ok = [False] * self.config.dp
        self._down = {r: self._describe() for r in range(self.config.dp)}

    def _serve_again(self, bad: set[int]) -> None:
        """Everything woke: replicas serve as before the sleep; `bad` ones are rebuilt."""
        dp = self.config.dp
        ok, down = self._awake_ok or ((False,) * dp, {})
        self._awake_ok = None
        self._down = {r: why for r, why in down.items() if r < dp}
        for replica in range(dp):
            self._ok[replica] = (
                replica < len(ok) and ok[replica] and not self._cleared and replica not in bad
            )
            if self._cleared:
                self._down[replica] = (
                    "the weights were discarded (sleep level 2 or clear): update it"
                )
        for replica in sorted(bad):
            self.log.warning("replica %d cannot wake: rebuilding it", replica)
            try:
                self._rebuild_replica(replica)
            except Exception as e:  # noqa: BLE001 - reported in status; the replica stays down
                self._replica_down(replica, e)

    # --- what waits while the fleet sleeps -----------------------------------------------

    def _transaction(
        self,
        spec: TransportSpec,
        feed=None,
        force: bool = False,
        expected: dict[int, str] | None = None,
    ) -> UpdateReport:
        if self._asleep.get("weights") == 1:
            raise StateError(
                f"fleet {self.config.name} is {self._describe()}: an update now would "
                "drop the weights kept in host memory; call wake_up() first, or sleep(level=2) "
                "to discard them"
            )
        report = super()._transaction(spec, feed, force, expected)
        if self._asleep:  # level 2: the update brought the weights back
            self._asleep = {t: v for t, v in self._asleep.items() if t != "weights"}
            self._awake_ok = ((True,) * self.config.dp, {})  # every replica took the update
            if self._asleep:
                self._mark_asleep()
            else:
                self._awake_ok = None
            self._sync_fronts()
        return report

    @ray.method(concurrency_group="status")
    def status(self) -> dict:
        return {**super().status(), "asleep": dict(self._asleep)}

    def heal(self) -> dict:
        if not self._asleep:
            self._recall_sleep()
        if not self._asleep:
            return super().heal()
        self.log.warning("heal waits: fleet %s is %s", self.config.name, self._describe())
        return {
            "version": self.version,
            "replicas_serving": list(self._ok),
            "restore_s": dict(self.restore_s),
            "replica_errors": dict(self._down),
            "asleep": dict(self._asleep),
        }

    def scale(self, dp: int) -> dict:
        if self._asleep:
            raise StateError(f"fleet {self.config.name} is {self._describe()}: scale it once awake")
        return super().scale(dp)

    def clear(self, mode: str | None = None) -> None:
        super().clear(mode)
        if self._asleep.get("weights") == 1:  # the ranks dropped their host copies
            self._asleep = deepened(self._asleep, 2, ["weights"])
            self._mark_asleep()
            self._sync_fronts()

    def _recall_sleep(self) -> None:
        """A coordinator that restarted while its fleet slept learns it from the ranks (and
        adopts their processes, as heal would), so it does not rebuild sleeping replicas."""
        statuses = {}
        for rank, actor in enumerate(self.ranks):
            try:
                statuses[rank] = ray.get(actor.status.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - wake_up rebuilds a replica that lost a rank
                continue
        asleep: dict[str, int] = {}
        for st in statuses.values():
            for tag, level in st["asleep"].items() if st["set_up"] else ():
                asleep[tag] = max(level, asleep.get(tag, 0))
        if not asleep:
            return
        self._nodes.update({r: st["node"] for r, st in statuses.items()})
        self._pids.update({r: st["pid"] for r, st in statuses.items() if st["set_up"]})
        self._awake_ok = ((self.version is not None,) * self.config.dp, {})
        self._asleep = asleep
        if asleep.get("weights") == 2:
            self._cleared = True
        self._mark_asleep()
        self.log.warning("fleet %s was %s when adopted", self.config.name, describe(asleep))
