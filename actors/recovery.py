"""Recovery: the coordinator's part that brings replicas back on the committed version.

`RecoveryMixin` notices lost ranks (`_lost`, `heal`), rebuilds replicas and loads the
committed version into them, verified against the committed fingerprints: from a replica
that serves it first (`_from_peer`: its ranks export their slices, the coordinator owns the
copies), else from the committed source, else from the rollback copy replica 0 made after
the commit of a version the transport kept nothing of (`_kept_copy`). Runs on the one
`CoordinatorActor` with placement and the transaction (see its `__init__`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import ray

from fd_ray_sync import metrics
from fd_ray_sync.errors import RankFailed, RestoreError
from fd_ray_sync.sources import TransportSpec
from fd_ray_sync.sources.peer import PeerSpec


class RecoveryMixin:
    """Rebuilds and restores (part of CoordinatorActor)."""

    def _rebuild_replica(self, replica: int) -> None:
        """Restart every rank process of a replica, form its world, load the committed version."""
        ranks = self._replica_ranks(replica)
        self._ok[replica] = False
        self.log.warning("rebuilding replica %d (ranks %s)", replica, ranks)
        # Requests in flight go back to the queue, to wait for the rebuild or go to another
        # replica; the drain is bounded (a hung rank is killed next anyway).
        self._close_gates("repair", "rebuilding: a rank was lost", "keep", [replica])
        try:
            for rank in ranks:
                ray.kill(self.ranks[rank], no_restart=False)
            metrics.rank_restart(self.config.name, replica, len(ranks))
            self._form_replica(replica)
            if self._committed is not None and not self._cleared:
                self._load_committed(replica)
        finally:
            self._sync_fronts([replica], reopen=("repair",))

    def _export(self, replica: int) -> dict[int, tuple[tuple, list]]:
        """Start copying `replica`'s weights into its node's store: rank -> (bucket metas,
        refs of the buckets being copied). The refs are this coordinator's (returned by
        its calls), so the copy outlives the exporting processes."""
        ranks = self._replica_ranks(replica)
        layouts = self._phase("export", lambda a: a.export_layout.remote(self.version), ranks)
        return {
            r: (
                layouts[r],
                [self.ranks[r].export_bucket.remote(self.version, i) for i in range(len(metas))],
            )
            for r, metas in layouts.items()
        }

    def _peer_spec(self, replica: int, export: dict[int, tuple[tuple, list]]) -> PeerSpec:
        ranks = self._replica_ranks(replica)
        return PeerSpec(
            self.version,
            replica=replica,
            metas=tuple(export[r][0] for r in ranks),
            refs=tuple(tuple(export[r][1]) for r in ranks),
        )

    def _from_peer(self, replica: int) -> TransportSpec | None:
        """The committed version as a serving replica's ranks export it (the first that
        can, other than `replica`), or None when no other replica serves it. Peers on
        `replica`'s own node come first: their copy reaches it without crossing a link."""
        home = self._replica_nodes(replica)
        peers = [
            p
            for p in range(self.config.dp)
            if p != replica and self._ok[p] and p not in self._behind
        ]
        peers.sort(key=lambda p: not home & self._replica_nodes(p))  # stable: then in order
        for peer in peers:
            try:
                return self._peer_spec(peer, self._export(peer))
            except RankFailed as e:
                self.log.warning("replica %d cannot export its weights: %s", peer, e)
        return None

    def _replica_nodes(self, replica: int) -> set[str]:
        return {self._nodes[r] for r in self._replica_ranks(replica) if r in self._nodes}

    def _make_rollback_copy(self, wait: bool) -> None:
        """With keep_committed, when the committed version's source goes with the trainer's
        next step (ipc, collective, a partial update): the first serving replica's ranks copy
        their slices into their node's store, the copy owned by this coordinator (see
        `_export`), so a restore finds it when no replica serves the version any more.
        Owned here, it dies with this coordinator: a restarted one makes it again (`wait`:
        until it is there, so that no failure after a restart finds it half made)."""
        self._keep = None
        committed = self._committed
        if not self.config.keep_committed or committed is None or committed.restorable:
            return
        serving = [p for p in range(self.config.dp) if self._ok[p] and p not in self._behind]
        for replica in serving:
            try:
                export = self._export(replica)
                if wait:
                    refs = [ref for _, refs in export.values() for ref in refs]
                    ray.get(refs, timeout=self.config.phase_timeout_s)
            except Exception as e:  # noqa: BLE001 - RankFailed, or a copy lost: the next one
                self.log.warning("replica %d cannot copy version %s: %s", replica, self.version, e)
                continue
            self._keep = (self.version, replica, export)
            return
        self.log.warning("no rollback copy of version %s: no replica could make it", self.version)

    def _kept_copy(self) -> TransportSpec | None:
        """The rollback copy a replica exported after the commit (transports whose data the
        trainer reuses), or None when there is none or it is lost."""
        if self._keep is None or self._keep[0] != self.version:
            return None
        version, replica, export = self._keep
        spec = self._peer_spec(replica, export)
        try:  # the copies finished (they ran right after the commit)
            ray.get(
                [ref for refs in spec.refs for ref in refs], timeout=self.config.phase_timeout_s
            )
        except Exception as e:  # noqa: BLE001 - no copy: the caller says so
            self.log.warning("the rollback copy of version %s is lost: %s", version, e)
            self._keep = None
            return None
        self._committed = spec
        return spec

    def _load_committed(self, replica: int) -> None:
        """Load the committed version into a replica, verified like an update: each rank's
        fingerprint must be the one committed, or the replica stays down (RestoreError).

        From a replica that serves it when there is one (the trainer is not needed), else
        from the committed source (kept buckets, a snapshot folder)."""
        started = time.perf_counter()
        ranks = self._replica_ranks(replica)
        spec = None if self._cleared else self._from_peer(replica)
        if spec is None:
            spec = self._committed
            if spec is not None and not spec.restorable:
                spec = self._kept_copy() or spec
        if self._cleared or spec is None or not spec.restorable:
            why = (
                "the fleet was cleared"
                if self._cleared
                else (
                    f"no replica serves version {self.version} and it was committed "
                    "without keeping a copy (keep_committed=False, or the ipc/collective "
                    "transport)"
                )
            )
            raise RestoreError(f"replica {replica}: nothing to restore: {why}; update it")
        self.log.info("restoring replica %d (source%s)", replica, spec.where)
        self._phase("restore", lambda a: a.restart.remote(), ranks)
        try:
            # Checked while copying: the replica does not serve until the restore passed,
            # so bytes that fail their check cost nothing but this replica staying down.
            prepared = self._phase("restore", lambda a: a.prepare.remote(spec, True), ranks)
        except RankFailed as e:
            raise RestoreError(
                f"replica {replica}: the committed source is refused now: {e}"
            ) from e
        moved = {
            r: p.recorded_version
            for r, p in prepared.items()
            if p.recorded_version not in (None, spec.version)
        }
        if moved:
            self._phase("restore", lambda a: a.resume.remote(), ranks)
            raise RestoreError(
                f"replica {replica}: the committed source now records version(s) {moved}, "
                f"not {spec.version}"
            )
        self._phase("restore", lambda a: a.load.remote(), ranks)
        want = {r: self._fingerprints.get(r) for r in ranks}
        check = all(want.values())
        checks = self._phase(
            "restore", lambda a: a.verify.remote(check or self.config.fingerprint), ranks
        )
        wrong = {
            r: f"fingerprint {checks[r]['fingerprint']}, committed {want[r]}"
            for r in ranks
            if check and checks[r]["fingerprint"] != want[r]
        }
        if wrong:
            raise RestoreError(
                f"replica {replica}: restored weights differ from version {spec.version} as "
                f"committed (its source changed since): "
                + "; ".join(f"rank {r}: {m}" for r, m in wrong.items())
            )
        keep = self.config.keep_committed
        self._phase("restore", lambda a: a.commit.remote(keep, self._fingerprints), ranks)
        self._ok[replica] = True
        self._down.pop(replica, None)
        self._sync_fronts([replica])
        self.restore_s[replica] = time.perf_counter() - started
        metrics.phase_seconds(self.config.name, "restore", self.restore_s[replica])
        metrics.committed_version(self.config.name, replica, spec.version)

    def _roll_back(self, replica: int) -> bool:
        """Undo a failed partial update on a replica: each rank writes back the old values of
        the tensors it overwrote (only those), then must match its committed fingerprint.
        False (logged) when that cannot be done: the caller restores the replica whole."""
        ranks = self._replica_ranks(replica)
        try:
            checks = self._phase("rollback", lambda a: a.rollback.remote(), ranks)
        except RankFailed as e:
            self.log.warning("replica %d cannot roll back its partial update: %s", replica, e)
            return False
        wrong = {
            r: f"fingerprint {checks[r]['fingerprint']}, committed {self._fingerprints[r]}"
            for r in ranks
            if self._fingerprints.get(r) not in (None, checks[r]["fingerprint"])
        }
        if wrong:
            self.log.warning("replica %d rolled back to other weights: %s", replica, wrong)
            return False
        restored = sum(len(c["restored"]) for c in checks.values())
        self.log.info(
            "replica %d rolled back %d tensor(s) to version %s", replica, restored, self.version
        )
        self._ok[replica] = True
        self._down.pop(replica, None)
        self._sync_fronts([replica])
        return True

    def _replica_down(self, replica: int, error: Exception) -> None:
        self._ok[replica] = False
        self._down[replica] = f"{type(error).__name__}: {error}"
        self.log.error("replica %d is down: %s", replica, self._down[replica])
        self._sync_fronts([replica])

    def _lost(self, ranks: Iterable[int]) -> set[int]:
        """Those of `ranks` that are not the process this coordinator set up: dead, replaced
        by a fresh, empty process, or not answering."""
        refs = {r: self.ranks[r].incarnation.remote() for r in ranks}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=10)
        stale = set()
        for rank, ref in refs.items():
            try:
                pid = ray.get(ref) if ref in ready else None
            except Exception:  # noqa: BLE001 - dead or restarting
                pid = None
            if pid is None or pid != self._pids.get(rank):
                stale.add(rank)
        return stale

    def _rebuild_lost(self, replicas: Iterable[int] | None = None) -> None:
        """Rebuild the replicas (all, or those given) with a rank lost while idle."""
        replicas = range(self.config.dp) if replicas is None else replicas
        ranks = [r for rep in replicas for r in self._replica_ranks(rep)]
        for replica in sorted({r // self.config.tp for r in self._lost(ranks)}):
            self.log.warning("replica %d lost a rank: rebuilding it", replica)
            try:
                self._rebuild_replica(replica)
            except Exception as e:  # noqa: BLE001 - reported in status; the replica stays down
                self._replica_down(replica, e)

    def heal(self) -> dict:
        """Make every replica serve the committed version again, rebuilding where needed."""
        statuses = {}
        for rank in range(self.world):
            try:
                statuses[rank] = ray.get(self.ranks[rank].status.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - dead, restarting or hung: rebuild it
                statuses[rank] = None
        self._nodes.update({r: st["node"] for r, st in statuses.items() if st is not None})
        self._pids.update(
            {r: st["pid"] for r, st in statuses.items() if st is not None and st["set_up"]}
        )
        for replica in range(self.config.dp):
            states = [statuses[r] for r in self._replica_ranks(replica)]
            alive = all(st is not None and st["set_up"] for st in states)
            if alive and (self._cleared or self.version is None):
                continue  # up, and nothing is meant to be loaded
            if alive and all(
                st["weights"] == "NORMAL"
                and st["version"] == self.version
                # None: committed without fingerprints (FleetConfig.fingerprint off)
                and self._fingerprints.get(st["rank"]) in (None, st["fingerprint"])
                for st in states
            ):
                self._ok[replica] = True
                continue
            try:
                self._rebuild_replica(replica)
            except Exception as e:  # noqa: BLE001 - reported; the replica stays down
                self._replica_down(replica, e)
        self._sync_fronts()
        return {
            "version": self.version,
            "replicas_serving": list(self._ok),
            "restore_s": dict(self.restore_s),  # the last load of each restored replica
            "replica_errors": dict(self._down),
        }
