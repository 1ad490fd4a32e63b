"""CoordinatorActor: a named actor that owns a fleet's ranks and runs its transactions.

Every phase of an update is one round of remote calls on all ranks joined with a timeout,
so the join is the barrier; nothing polls. One writer at a time: the actor runs one method
at a time (status questions have their own concurrency group), so generation requests wait
for a running update to commit or abort and never see two versions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.weight_manager import EngineFactory, WeightManagerActor
from fd_ray_sync.buckets import BucketMeta
from fd_ray_sync.config import FleetConfig
from fd_ray_sync.errors import (
    REFUSED_BEFORE_WRITE,
    PhaseTimeout,
    RankFailed,
    StateError,
    VerificationError,
    VersionError,
)
from fd_ray_sync.log import get_logger
from fd_ray_sync.messages import GenerationResult, LoadReport, UpdateReport
from fd_ray_sync.version import is_newer, validate_version

# The transaction's phases in order (DESIGN.md "Update transaction").
PHASES = ("begin", "pause", "clear", "restart", "load", "verify", "commit")


@ray.remote(num_cpus=0, concurrency_groups={"status": 1})
class CoordinatorActor:
    def __init__(self, config: FleetConfig, engine_factory: EngineFactory):
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        self.config = config
        self.log = get_logger(__name__, "coordinator")
        self._factory = engine_factory
        self.ranks: list = []
        self.pg = None
        self.version: str | None = None
        # What the committed version was loaded from, kept until the next commit so an
        # aborted update can put it back: ("buckets", metas, refs) or ("snapshot", folder).
        self._committed: tuple | None = None
        self._serving = False
        self._next_replica = 0

    # --- launch --------------------------------------------------------------------------

    def start(self) -> dict:
        cfg = self.config
        world = cfg.tp * cfg.dp
        use_gpu = cfg.use_gpu
        if use_gpu is None:
            use_gpu = ray.cluster_resources().get("GPU", 0) >= world
        if use_gpu != cfg.use_gpu:
            cfg = self.config = cfg.model_copy(update={"use_gpu": use_gpu})
        bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}
        self.pg = placement_group([dict(bundle) for _ in range(world)], strategy="PACK")
        if not self.pg.wait(timeout_seconds=cfg.phase_timeout_s):
            raise StateError(
                f"could not place {world} ranks with {bundle} each within "
                f"{cfg.phase_timeout_s}s; cluster has {ray.cluster_resources()}"
            )
        for rank in range(world):
            actor = WeightManagerActor.options(
                num_cpus=1,
                num_gpus=1 if use_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, rank),
                # One BLAS thread per rank: ranks already use every core between them.
                runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
            ).remote(cfg.parallel(rank), cfg.load, self._factory)
            self.ranks.append(actor)
        endpoints = self._phase("endpoints", lambda r: r.get_endpoint.remote())
        ordered = [endpoints[r] for r in range(world)]
        info = self._phase("setup", lambda r: r.setup.remote(ordered))
        self.log.info("fleet %s up: dp=%d x tp=%d on %s", cfg.name, cfg.dp, cfg.tp, bundle)
        if cfg.load.model_dir is not None:
            self.update_snapshot(str(cfg.load.model_dir), None)
        return {"world": world, "use_gpu": use_gpu, "ranks": info}

    # --- phases --------------------------------------------------------------------------

    def _phase(self, name: str, call: Callable, ranks: Sequence[int] | None = None) -> dict:
        """Run `call(actor)` on every rank and join them: the barrier of one phase."""
        ranks = list(range(len(self.ranks))) if ranks is None else list(ranks)
        refs = {rank: call(self.ranks[rank]) for rank in ranks}
        timeout = self.config.phase_timeout_s
        _, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
        pending = set(pending)
        results, failures, errors = {}, {}, {}
        for rank, ref in refs.items():
            if ref in pending:
                failures[rank] = f"no answer within {timeout:.0f}s"
                continue
            try:
                results[rank] = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if e.cause is not None else e
                errors[rank] = cause
                failures[rank] = f"{type(cause).__name__}: {cause}"
            except ray.exceptions.RayActorError as e:
                failures[rank] = f"rank actor died: {e}"
        if pending:
            for ref in pending:
                ray.cancel(ref)
            raise PhaseTimeout(f"phase '{name}' timed out on rank(s) {sorted(failures)}")
        if failures:
            raise RankFailed(name, failures, errors)
        return results

    # --- updates -------------------------------------------------------------------------

    def update_buckets(
        self,
        metas: list[BucketMeta],
        refs: list,
        version: str,
        expected_fingerprints: dict[int, str] | None = None,
        force: bool = False,
    ) -> UpdateReport:
        """Load a bucketed update (refs arrive inside a list so they stay refs)."""

        def load(actor):
            return actor.load_buckets.remote(metas, refs, version)

        nbytes = sum(m.nbytes for m in metas)
        return self._transaction(
            version, load, ("buckets", metas, refs), nbytes, expected_fingerprints, force
        )

    def update_snapshot(
        self, folder: str, version: str | None, force: bool = False
    ) -> UpdateReport:
        def load(actor):
            return actor.load_snapshot.remote(folder, version)

        return self._transaction(version, load, ("snapshot", folder), 0, None, force)

    def _transaction(
        self,
        version: str | None,
        load: Callable,
        source: tuple,
        nbytes: int,
        expected: dict[int, str] | None,
        force: bool,
    ) -> UpdateReport:
        phase_s: dict[str, float] = {}
        start = time.perf_counter()
        if not self.ranks:
            raise StateError("the fleet has no ranks: call start() first")

        def timed(name, fn):
            t = time.perf_counter()
            out = fn()
            phase_s[name] = time.perf_counter() - t
            return out

        # 1. begin: the version must be valid and new (a snapshot may name it in version.yaml).
        if version is not None:
            version = validate_version(version)
            self._check_newer(version, force)
        may_have_written = False
        try:
            # 2. pause: stop serving, drop requests and caches.
            timed("pause", lambda: self._phase("pause", lambda r: r.pause.remote()))
            # 3. clear (in-place mode only): free weights and KV cache to make room.
            if self.config.clear_before_load:
                may_have_written = True
                timed("clear", lambda: self._phase("clear", lambda r: r.clear.remote()))
            # 4. restart: comm groups and EP buffer come back if they were torn down.
            timed("restart", lambda: self._phase("restart", lambda r: r.restart.remote()))
            # 5. load: every rank checks everything, then writes its slice.
            try:
                reports: dict[int, LoadReport] = timed("load", lambda: self._phase("load", load))
            except Exception as e:
                # Nothing was written only if every rank refused the update before writing.
                refused = e.errors if isinstance(e, RankFailed) else {}
                may_have_written |= len(refused) < len(self.ranks) or not all(
                    isinstance(err, REFUSED_BEFORE_WRITE) for err in refused.values()
                )
                raise
            may_have_written = True
            versions = {r.version for r in reports.values()}
            if len(versions) != 1:
                raise VerificationError(f"ranks loaded different versions: {sorted(versions)}")
            loaded = versions.pop()
            if version is None:
                self._check_newer(loaded, force)
            # 6. verify: every parameter loaded, fingerprints as the trainer computed them.
            checks = timed("verify", lambda: self._phase("verify", lambda r: r.verify.remote()))
            fingerprints = {rank: c["fingerprint"] for rank, c in checks.items()}
            if expected:
                wrong = {
                    r: f"fingerprint {fingerprints[r]}, trainer expected {expected[r]}"
                    for r in expected
                    if fingerprints.get(r) != expected[r]
                }
                if wrong:
                    raise RankFailed("verify", wrong)
            # 7. commit: TP/EP barriers, status NORMAL, KV cache back, serve the new version.
            timed("commit", lambda: self._phase("commit", lambda r: r.commit.remote()))
        except Exception as e:
            self._abort(e, may_have_written)
            raise
        self.version, self._committed, self._serving = loaded, source, True
        report = UpdateReport(
            version=loaded,
            nbytes=nbytes or sum(r.nbytes for r in reports.values()),
            phase_s=phase_s,
            total_s=time.perf_counter() - start,
            ranks=tuple(reports[r] for r in sorted(reports)),
            fingerprints=fingerprints,
        )
        self.log.info(
            "committed version %s in %.3fs (%s)",
            loaded,
            report.total_s,
            ", ".join(f"{k} {v:.3f}s" for k, v in phase_s.items()),
        )
        return report

    def _check_newer(self, version: str, force: bool) -> None:
        if not force and not is_newer(version, self.version):
            raise VersionError(
                f"version {version!r} is not newer than the fleet's {self.version!r} "
                "(pass force=True to load it anyway)"
            )

    def _abort(self, error: Exception, may_have_written: bool) -> None:
        """Return every rank to the last committed version, or leave the fleet not serving."""
        self.log.warning("update aborted: %s", error)
        if not may_have_written:
            self._phase("resume", lambda r: r.resume.remote())
            return
        self._serving = False
        if self._committed is None:
            self.log.error("no committed version to restore: the fleet stays down")
            return
        kind, *args = self._committed
        if kind == "buckets":
            metas, refs = args

            def load(actor):
                return actor.load_buckets.remote(metas, refs, self.version)
        else:
            (folder,) = args

            def load(actor):
                return actor.load_snapshot.remote(folder, self.version)

        try:
            self._phase("restore", lambda r: r.restart.remote())
            self._phase("restore", load)
            self._phase("restore", lambda r: r.verify.remote())
            self._phase("restore", lambda r: r.commit.remote())
            self._serving = True
            self.log.warning("restored version %s on every rank", self.version)
        except Exception as e:  # noqa: BLE001 - the original error is what the caller sees
            self.log.error("restoring version %s failed: %s", self.version, e)

    def clear(self) -> None:
        """Free every rank's weights and KV cache; the fleet stops serving until an update."""
        self._phase("clear", lambda r: r.clear.remote())
        self._serving = False

    # --- serving -------------------------------------------------------------------------

    def generate(
        self, prompts: list[str], max_new_tokens: int, replica: int | None = None
    ) -> list[GenerationResult]:
        """Run on every TP rank of one replica at once; results carry their version."""
        if not self._serving:
            raise StateError(
                f"fleet {self.config.name} is not serving (version {self.version}): update it first"
            )
        if replica is None:
            replica = self._next_replica
            self._next_replica = (replica + 1) % self.config.dp
        ranks = self.config.parallel().replica_ranks(replica)
        out = self._phase(
            "generate", lambda r: r.generate.remote(prompts, max_new_tokens), ranks=ranks
        )
        versions = {o["version"] for o in out.values()}
        if len(versions) != 1:
            raise VerificationError(f"replica {replica} ranks answered from versions {versions}")
        first = out[ranks[0]]
        return [
            GenerationResult(prompt=p, text=t, version=first["version"], replica=replica)
            for p, t in zip(prompts, first["texts"])
        ]

    def shard_plans(self) -> dict[int, dict]:
        return self._phase("shard_plan", lambda r: r.shard_plan.remote())

    @ray.method(concurrency_group="status")
    def status(self) -> dict:
        ranks = ray.get([r.status.remote() for r in self.ranks], timeout=30) if self.ranks else []
        return {
            "name": self.config.name,
            "version": self.version,
            "serving": self._serving,
            "dp": self.config.dp,
            "tp": self.config.tp,
            "ranks": ranks,
        }

    def shutdown(self) -> None:
        for actor in self.ranks:
            ray.kill(actor)
        self.ranks = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
        self._serving = False
