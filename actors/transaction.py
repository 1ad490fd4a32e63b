"""The update transaction: numbered phases run on every rank, all-or-nothing.

`TransactionMixin` holds `_phase` (one round of remote calls joined with a timeout: the
barrier), `update` (bytes already in place; pipelined updates come in through
`FeedMixin.update_stream`, actors/feeding.py), the numbered phases of `_transaction` with
its abort, and rolling updates. It lives apart from placement and serving so the phases
read in one place; all of them run on the one `CoordinatorActor` and share its state (see
its `__init__`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import ray

from actors.placement import RANK_LOST
from fd_ray_sync import metrics
from fd_ray_sync.errors import (
    PartialUpdateError,
    PhaseTimeout,
    RankFailed,
    RestoreError,
    StateError,
    VersionError,
)
from fd_ray_sync.feed import BucketFeed
from fd_ray_sync.messages import LoadReport, PrepareReport, UpdateReport
from fd_ray_sync.sources import TransportSpec, VersionOnly
from fd_ray_sync.version import is_newer, validate_version


class TransactionMixin:
    """The phases of an update (part of CoordinatorActor)."""

    # --- phases --------------------------------------------------------------------------

    def _phase(
        self,
        name: str,
        call: Callable,
        ranks: Iterable[int] | None = None,
        on_failure: Callable[[str], None] | None = None,
        fail_fast: bool = False,
    ) -> dict:
        """Run `call(actor)` on the ranks and join them: the barrier of one phase.

        `on_failure(reason)` runs as soon as one rank fails, while the others still run
        (a pipelined load closes its feed, so ranks waiting for buckets stop at once). With
        `fail_fast`, the first failure ends the wait: the ranks still running (in a
        collective with the failed one, most likely) are reported lost.
        """
        ranks = list(range(self.world)) if ranks is None else list(ranks)
        refs = {rank: call(self.ranks[rank]) for rank in ranks}
        timeout = self.config.phase_timeout_s
        stop = False  # a rank failed and fail_fast: the others are abandoned
        if on_failure is None and not fail_fast:
            _, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
        else:
            on_failure = on_failure or (lambda reason: None)
            pending, rank_of = list(refs.values()), {ref: r for r, ref in refs.items()}
            deadline = time.monotonic() + timeout
            while pending and not stop and (left := deadline - time.monotonic()) > 0:
                done, pending = ray.wait(pending, num_returns=1, timeout=left)
                for ref in done:
                    try:
                        ray.get(ref)
                    except Exception as e:  # noqa: BLE001 - reported below, with the rest
                        on_failure(f"rank {rank_of[ref]} failed in {name}: {type(e).__name__}")
                        stop = fail_fast
        pending = set(pending)
        results, failures, errors, lost = {}, {}, {}, set()
        for rank, ref in refs.items():
            if ref in pending:
                failures[rank] = (
                    "abandoned: a peer failed first" if stop else f"no answer within {timeout:g}s"
                )
                lost.add(rank)
                continue
            try:
                results[rank] = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if e.cause is not None else e
                errors[rank] = cause
                failures[rank] = f"{type(cause).__name__}: {cause}"
            except RANK_LOST as e:
                failures[rank] = f"rank actor died: {type(e).__name__}"
                lost.add(rank)
        if pending and not stop:
            # A sync actor's running task cannot be interrupted: the slow ranks are `lost`,
            # and rebuilding their replica restarts those processes.
            raise PhaseTimeout(name, failures, errors, lost)
        if failures:
            raise RankFailed(name, failures, errors, lost)
        return results

    # --- updates -------------------------------------------------------------------------

    def update(
        self,
        spec: TransportSpec,
        force: bool = False,
        expected: dict[int, str] | None = None,
    ) -> UpdateReport:
        """Load an update whose bytes are all in place already (a snapshot folder, the
        trainer's registered storage); `expected`: each rank's fingerprint, as the trainer
        computed it."""
        return self._transaction(spec, None, force, expected)

    def _transaction(
        self,
        spec: TransportSpec,
        feed: BucketFeed | None = None,
        force: bool = False,
        expected: dict[int, str] | None = None,
    ) -> UpdateReport:
        """One update, all-or-nothing, as numbered phases (see DESIGN.md).

        A `spec.partial` update carries some of the parameters; the others keep their
        committed values. The trainer's fingerprints cover what it sent, so each rank's
        fingerprint of what it wrote is checked against them, and the whole model's
        fingerprints must agree among replicas (those are committed). A failure rolls the
        written ranks back tensor by tensor (each kept the old values of what it
        overwrote). Its committed source is no whole model: restores come from a peer
        replica, or from replica 0's copy exported after the commit.
        """
        if not self.ranks:
            raise StateError("the fleet has no ranks: call start() first")
        partial = spec.partial
        phase_s: dict[str, float] = {}
        start = time.perf_counter()
        # Rolling mode: the transaction loads the first replicas only; `_roll` brings the
        # others over after the commit, a few at a time, while the rest serve.
        first = self._first_replicas()
        everyone = {r for rep in first for r in self._replica_ranks(rep)}
        close_feed = feed.close if spec.streaming else None

        def timed(name, call, on_failure=None):
            t = time.perf_counter()
            self._running_phase = name  # `status` reports it (the CLI's progress bar)
            try:
                return self._phase(name, call, everyone, on_failure=on_failure)
            finally:  # a failed phase counts too, up to its failure (a refusal, a timeout)
                self._running_phase = None
                phase_s[name] = time.perf_counter() - t
                metrics.phase_seconds(self.config.name, name, phase_s[name])

        # 1. begin: the version must be valid and new (a snapshot may name it in version.yaml);
        # a replica that lost a rank while idle is rebuilt first.
        if spec.version is not None:
            validate_version(spec.version)
            self._check_newer(spec.version, force)
        if partial and (self.version is None or self._cleared or self.config.clear_before_load):
            raise StateError(
                "a partial update keeps the committed values of the parameters it does not "
                "carry, but "
                + (
                    "this fleet clears its weights before each load (clear_before_load)"
                    if self.config.clear_before_load
                    else "the fleet holds none (never updated, or cleared)"
                )
                + "; send every parameter (partial=False)"
            )
        self._rebuild_lost()
        # 2. prepare: every rank checks everything it can know before writing; nothing
        # pauses, enters a collective or writes until every rank said yes. A refusal costs
        # the checks and changes nothing.
        after = (
            spec.check_while_copying
            or partial  # every rank keeps the old values of what it overwrites
            or (self._committed is not None and self._committed.restorable and not self._cleared)
        )
        try:
            prepared = timed("prepare", lambda a: a.prepare.remote(spec, after), close_feed)
            loaded = self._agreed_version(spec, prepared, force)
        except Exception as e:
            self._abort(e, touched=set(), partial=partial)
            raise
        spec = spec.with_version(loaded)
        touched: set[int] = set()  # ranks whose weights may no longer be the committed ones
        try:
            # 3. pause: close every replica's gate, its requests drained as the pause mode
            # says (actors/front.py), then the ranks drop requests and caches.
            gated = time.perf_counter()
            why = f"updating to version {loaded}"
            self._close_gates("update", why, self.config.pause_mode, first)
            timed("pause", lambda a: a.pause.remote())
            phase_s["pause"] = time.perf_counter() - gated  # the drain included
            # 4. clear (in-place mode only): free weights and KV cache to make room.
            if self.config.clear_before_load:
                touched = everyone
                timed("clear", lambda a: a.clear.remote())
            # 5. restart: comm groups and EP buffer come back if they were torn down.
            timed("restart", lambda a: a.restart.remote())
            # 6. load: ranks write what they checked. A rank that fails before its first
            # write raises its error as it is; one that wrote raises PartialUpdateError.
            try:
                reports: dict[int, LoadReport] = timed(
                    "load", lambda a: a.load.remote(), close_feed
                )
            except RankFailed as e:
                touched = touched | {
                    r
                    for r in everyone
                    if r not in e.failures or isinstance(e.errors.get(r), PartialUpdateError)
                }
                raise
            touched = everyone
            if feed is not None:
                feed.wait_end(self.config.phase_timeout_s)
                expected = feed.expected
            sent, transport = spec.nbytes, spec.transport  # as sent: `received` may differ
            if spec.streaming:  # what the ranks received, to restore it later
                spec = spec.received(feed)
            # 7. verify: every parameter loaded, fingerprints as the trainer computed them.
            fp = self.config.fingerprint or bool(expected)
            checks = timed("verify", lambda a: a.verify.remote(fp))
            fingerprints = {rank: c["fingerprint"] for rank, c in checks.items()}
            # A partial update's trainer saw only what it sent: what each rank wrote.
            checked = (
                {rank: c["written"] for rank, c in checks.items()} if partial else fingerprints
            )
            what = "written tensors' fingerprint" if partial else "fingerprint"
            wrong = {
                r: f"{what} {checked.get(r)}, trainer expected {want}"
                for r, want in (expected or {}).items()
                if r in everyone and checked.get(r) != want
            }
            if fp and (partial or not expected):  # replicas must at least agree
                tp = self.config.tp
                wrong |= {
                    r: f"fingerprint {f}, rank {r % tp} of replica 0 has {fingerprints[r % tp]}"
                    for r, f in fingerprints.items()
                    if f != fingerprints.get(r % tp)
                }
            if wrong:
                raise RankFailed("verify", wrong)
            # 8. commit: TP/EP barriers, status NORMAL, KV cache back, serve the new version.
            keep = self.config.keep_committed
            timed("commit", lambda a: a.commit.remote(keep, fingerprints))
        except Exception as e:
            self._abort(e, touched, partial)
            raise
        self.version = loaded
        if partial:  # not the whole model: restores take a peer's, or replica 0's copy
            self._committed = VersionOnly(loaded)
        else:
            self._committed = spec if self.config.keep_committed else spec.without_data()
        # Every rank's committed fingerprint, as its TP rank's (replicas not loaded yet).
        tp = self.config.tp
        self._fingerprints = {r: fingerprints[r % tp] for r in range(self.world)}
        self._behind = set(range(self.config.dp)) - set(first)
        for replica in first:
            self._ok[replica] = True
            self._down.pop(replica, None)
        self._cleared = False
        self._sync_fronts(first, reopen=("update",))
        for replica in first:
            metrics.committed_version(self.config.name, replica, loaded)
        # ipc, collective: the trainer's buffers are reused; a serving replica's ranks copy
        # their slices into their node's store after this returns (nobody waits for it).
        self._make_rollback_copy(wait=False)
        behind = self._roll()
        report = UpdateReport(
            version=loaded,
            nbytes=sent or sum(r.nbytes for r in reports.values()),
            phase_s=phase_s,
            total_s=time.perf_counter() - start,
            ranks=tuple(reports[r] for r in sorted(reports)),
            fingerprints=fingerprints,
            replicas_down=behind,
        )
        metrics.update_bytes(self.config.name, transport, report.nbytes)
        self.log.info(
            "committed version %s in %.3fs (%s)",
            loaded,
            report.total_s,
            ", ".join(f"{k} {v:.3f}s" for k, v in phase_s.items()),
        )
        return report

    def _first_replicas(self) -> list[int]:
        """The replicas the transaction loads: all, or in rolling mode the first
        `rolling_replicas` (the next update's group, the collective's members)."""
        dp = self.config.dp
        if self.config.update_mode == "rolling":
            return list(range(min(self.config.rolling_replicas, dp)))
        return list(range(dp))

    def _roll(self) -> dict[int, str]:
        """Rolling mode, after the first replicas committed: the others, a few at a time,
        close their gates (pause mode as configured), load the committed version (from a
        replica that serves it, as a restore) and serve again, while the rest answer from
        the version each holds. A replica that cannot take it is rebuilt on it, else stays
        down. Returns replica -> why it is down."""
        step = self.config.rolling_replicas
        order = sorted(self._behind)
        for at in range(0, len(order), step):
            group = order[at : at + step]
            why = f"rolling to version {self.version}"
            self._close_gates("update", why, self.config.pause_mode, group)
            ranks = [r for replica in group for r in self._replica_ranks(replica)]
            for replica in group:
                self._ok[replica] = False
            try:
                self._phase("pause", lambda a: a.pause.remote(), ranks)
            except RankFailed as e:
                self.log.warning("rolling: replicas %s did not pause: %s", group, e)
            for replica in group:
                try:
                    self._load_committed(replica)
                except Exception as e:  # noqa: BLE001 - that replica only
                    self._replica_down(replica, e)
                    try:
                        self._rebuild_replica(replica)
                    except Exception as e2:  # noqa: BLE001
                        self._replica_down(replica, e2)
                self._behind.discard(replica)
            self._sync_fronts(group, reopen=("update",))
        return {r: self._down[r] for r in range(self.config.dp) if not self._ok[r]}

    def _agreed_version(
        self, spec: TransportSpec, prepared: dict[int, PrepareReport], force: bool
    ) -> str:
        """The version the update loads: the one given, or the one every rank's source
        records. A source recording another version than the one given is stale."""
        recorded = {r: p.recorded_version for r, p in prepared.items()}
        where = spec.where
        if spec.version is None:
            found = set(recorded.values())
            if len(found) != 1 or None in found:
                raise VersionError(
                    f"the ranks' sources{where} record different versions: {recorded}"
                )
            loaded = found.pop()
            self._check_newer(loaded, force)
            return loaded
        stale = {r: v for r, v in recorded.items() if v is not None and v != spec.version}
        if stale and not force:
            raise VersionError(
                f"the update is version {spec.version!r} but its source{where} records "
                f"{sorted(set(stale.values()))} (version.yaml): a stale or reused folder; "
                "pass force=True to load it as the given version anyway"
            )
        return spec.version

    def _check_newer(self, version: str, force: bool) -> None:
        if not force and not is_newer(version, self.version):
            raise VersionError(
                f"version {version!r} is not newer than the fleet's {self.version!r} "
                "(pass force=True to load it anyway)"
            )

    def _abort(self, error: Exception, touched: set[int], partial: bool = False) -> None:
        """Put every replica back on the committed version: a replica that lost a rank is
        rebuilt, one whose ranks wrote nothing just resumes, the others are restored (and
        checked against the committed fingerprints); a replica that cannot be stays down,
        its reason in `status`. After a `partial` update the written replicas first put
        back the old values of the tensors they overwrote (`_roll_back`), and are restored
        whole only if that fails."""
        self.log.warning("update aborted: %s", error)
        metrics.abort(self.config.name, metrics.abort_cause(error))
        lost = error.lost if isinstance(error, RankFailed) else frozenset()
        untouched = [
            r
            for r in range(self.config.dp)
            if not touched.intersection(self._replica_ranks(r))
            and not lost.intersection(self._replica_ranks(r))
        ]
        for replica in range(self.config.dp):
            if replica not in untouched:
                self._ok[replica] = False  # no peer restores from a replica that was written
        # Replicas that wrote nothing resume first: the others may restore from them.
        for replica in [*untouched, *(r for r in range(self.config.dp) if r not in untouched)]:
            ranks = self._replica_ranks(replica)
            try:
                if lost.intersection(ranks):
                    self._rebuild_replica(replica)
                elif replica in untouched:
                    self._phase("resume", lambda a: a.resume.remote(), ranks)
                elif not (partial and self._roll_back(replica)):
                    self._load_committed(replica)
            except Exception as e:  # noqa: BLE001 - the caller gets the original error
                self._replica_down(replica, e)
                if isinstance(e, RestoreError):
                    continue  # the committed source changed: rebuilding cannot help
                try:
                    self._rebuild_replica(replica)
                except Exception as e2:  # noqa: BLE001
                    self._replica_down(replica, e2)
        self._sync_fronts(reopen=("update",))
