"""Placement of a fleet's ranks: the coordinator's part that creates and removes them.

`PlacementMixin` places the rank actors (one placement group per replica), forms each
replica's world, scales the fleet, adopts the ranks after a coordinator restart (`_adopt`)
and shuts them down. Bringing replicas back on the committed version is `RecoveryMixin`'s
(`actors/recovery.py`). Both run on the one `CoordinatorActor` and share its state (see its
`__init__`).
"""

from __future__ import annotations

import time

import ray
from ray.util.placement_group import (
    get_placement_group,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.front import ACTOR_GONE, ReplicaFrontActor, front_actor_name
from actors.weight_manager import WeightManagerActor
from fd_ray_sync import gpus, metrics
from fd_ray_sync.config import FleetConfig
from fd_ray_sync.errors import PhaseTimeout, RankFailed, StateError
from fd_ray_sync.sources.snapshot import SnapshotSpec
from fd_ray_sync.version import is_newer

RANK_LOST = ACTOR_GONE  # what a call on a rank raises when it is dead or being restarted


def rank_actor_name(fleet: str, rank: int) -> str:
    return f"{fleet}.rank{rank}"


class PlacementMixin:
    """Launch, adoption, rebuild and shutdown of a fleet's ranks (part of CoordinatorActor)."""

    def _adopt(self) -> None:
        """After a coordinator restart: find the placement groups and ranks by name and
        rebuild the state. A rank that died meanwhile is created anew (heal rebuilds it)."""
        pgs = []
        while True:  # as many replicas as placement groups (a scale() changed the count)
            try:
                pgs.append(get_placement_group(_pg_name(self.config.name, len(pgs))))
            except ValueError:
                break
        if not pgs:
            return  # a new fleet: start() creates everything
        self.pgs = pgs
        self._resize(len(pgs))
        if self.config.use_gpu is None:  # what start() decided, as the groups hold it
            use_gpu = self.pgs[0].bundle_specs[0].get("GPU", 0) > 0
            self.config = self.config.model_copy(update={"use_gpu": use_gpu})
        self.ranks = [self._find_rank(rank) for rank in range(self.world)]
        self._fronts = [self._find_front(replica) for replica in range(len(pgs))]
        states = []
        for rank in range(self.world):
            try:
                states.append(ray.get(self.ranks[rank].committed_state.remote(), timeout=30))
            except Exception:  # noqa: BLE001 - a rank we cannot ask gets rebuilt below
                pass
        known = [(spec, fps) for spec, fps in states if spec is not None]
        if known:
            newest = max(known, key=lambda k: _VersionKey(k[0].version))[0].version
            # A replica restored from a peer records the peer's copy, whose objects the dead
            # coordinator owned: gone with it. Prefer a source that outlived it.
            same = sorted(
                (k for k in known if k[0].version == newest),
                key=lambda k: k[0].transport == "peer" or not k[0].restorable,
            )
            spec, self._fingerprints = same[0]
            self._committed = spec.without_data() if spec.transport == "peer" else spec
            self.version = self._committed.version
        self.log.warning(
            "restarted: adopted %d ranks, committed version %s", self.world, self.version
        )
        self.heal()
        self._make_rollback_copy(wait=True)  # the old one died with its owner, the old us
        self._sync_fronts()

    def start(self) -> dict:
        """Place and create the rank actors, form each replica's world, bootstrap-load."""
        if self.ranks:
            return {"world": self.world, "use_gpu": self.config.use_gpu, "adopted": True}
        cfg = self.config
        use_gpu = cfg.use_gpu
        if use_gpu is None:
            use_gpu = ray.cluster_resources().get("GPU", 0) >= self.world
            cfg = self.config = cfg.model_copy(update={"use_gpu": use_gpu})
        self._place(range(cfg.dp))
        for replica in range(cfg.dp):
            self._form_replica(replica)
        self._sync_fronts()
        self.log.info("fleet %s up: dp=%d x tp=%d (GPUs: %s)", cfg.name, cfg.dp, cfg.tp, use_gpu)
        if cfg.load.model_dir is not None:
            self.update(SnapshotSpec(None, folder=str(cfg.load.model_dir)))
        return {"world": self.world, "use_gpu": use_gpu, "adopted": False}

    def _place(self, replicas: range) -> None:
        """Placement groups and rank actors of `replicas` (the last ones of the fleet)."""
        cfg, use_gpu = self.config, bool(self.config.use_gpu)
        bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}
        # One placement group per replica, its ranks on one node (TP traffic stays inside
        # it); replicas aimed at different nodes. Not detached unless the fleet is: then the
        # groups, and the ranks placed in them, end with the driver's job.
        targets = _spread_targets(cfg.dp, cfg.tp, bundle)
        pgs = [
            placement_group(
                [dict(bundle) for _ in range(cfg.tp)],
                strategy="STRICT_PACK",
                name=_pg_name(cfg.name, replica),
                lifetime="detached" if cfg.detached else None,
                _soft_target_node_id=targets[replica],
            )
            for replica in replicas
        ]
        if not all(pg.wait(timeout_seconds=cfg.phase_timeout_s) for pg in pgs):
            for pg in pgs:
                remove_placement_group(pg)
            raise StateError(
                f"could not place {len(pgs)} replica(s) of {cfg.tp} ranks ({bundle} each, "
                f"one node per replica) within {cfg.phase_timeout_s}s; the cluster has "
                f"{ray.cluster_resources()}"
            )
        self.pgs = [*self.pgs, *pgs]
        first, last = replicas.start * cfg.tp, replicas.stop * cfg.tp
        self.ranks = [*self.ranks, *(self._create_rank(r, use_gpu) for r in range(first, last))]
        self._fronts = [*self._fronts, *(self._create_front(r) for r in replicas)]

    def _resize(self, dp: int) -> None:
        self._ok = (self._ok + [False] * dp)[:dp]
        self.config = self.config.model_copy(update={"dp": dp})
        self.world = dp * self.config.tp

    def scale(self, dp: int) -> dict:
        """Add or remove replicas while the others keep serving. A new replica loads the
        committed version from a serving replica (else from the committed source) and
        serves once its fingerprints match the committed ones; if that fails, the new
        replicas are removed again and the error raised."""
        if dp < 1:
            raise StateError(f"a fleet needs at least one replica, not dp={dp}")
        old, tp = self.config.dp, self.config.tp
        if dp < old:
            self._remove_replicas(dp)
        elif dp > old:
            self._resize(dp)
            try:
                self._place(range(old, dp))
                for rank in range(old * tp, dp * tp):  # the committed version, as its TP rank
                    if rank % tp in self._fingerprints:
                        self._fingerprints[rank] = self._fingerprints[rank % tp]
                for replica in range(old, dp):
                    self._form_replica(replica)
                    if self._committed is not None and not self._cleared:
                        self._load_committed(replica)
            except Exception:
                self._remove_replicas(old)
                raise
            self._sync_fronts(range(old, dp))
        self.log.info("fleet %s scaled from dp=%d to dp=%d", self.config.name, old, dp)
        return {"dp": dp, "replicas_serving": list(self._ok)}

    def _remove_replicas(self, dp: int) -> None:
        """Kill the ranks of replicas dp.. and remove their placement groups."""
        tp, cfg = self.config.tp, self.config
        gone = [*self.ranks[dp * tp :], *self._fronts[dp:]]
        self._close_gates("down", "scaled away", self.config.pause_mode, range(dp, cfg.dp))
        self.ranks, self._fronts = self.ranks[: dp * tp], self._fronts[:dp]
        for actor in gone:
            ray.kill(actor, no_restart=True)
        for replica in range(dp, len(self.pgs)):
            try:
                remove_placement_group(get_placement_group(_pg_name(cfg.name, replica)))
            except ValueError:
                pass
        self.pgs = self.pgs[:dp]
        for rank in range(dp * tp, self.world):
            for table in (self._nodes, self._pids, self._fingerprints):
                table.pop(rank, None)
        for replica in range(dp, cfg.dp):
            self._down.pop(replica, None)
        self._resize(dp)

    def _find_rank(self, rank: int):
        """The named rank actor, or a new one if it is gone."""
        try:
            return ray.get_actor(rank_actor_name(self.config.name, rank), self.config.namespace)
        except ValueError:
            return self._create_rank(rank, bool(self.config.use_gpu))

    def _find_front(self, replica: int):
        """After a restart: the replica's front, which served on meanwhile (or a new one)."""
        try:
            return ray.get_actor(front_actor_name(self.config.name, replica), self.config.namespace)
        except ValueError:
            return self._create_front(replica)

    def _create_front(self, replica: int, attempts: int = 50):
        """The replica's front (actors/front.py): closed until `_sync_fronts` says it
        serves. Detached like the ranks, so requests go on being served while this
        coordinator restarts (a restarted one adopts the fronts by name); it still ends with
        the replica's placement group, so with the driver's job unless the fleet is
        detached. In that group, taking none of its resources."""
        for _ in range(attempts):
            try:
                return self._front_actor(replica)
            except ValueError:  # the name is still a removed replica's front's, dying
                time.sleep(0.1)
        return self._front_actor(replica)

    def _front_actor(self, replica: int):
        cfg = self.config
        return ReplicaFrontActor.options(
            name=front_actor_name(cfg.name, replica),
            namespace=cfg.namespace,
            lifetime="detached",
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pgs[replica], 0),
        ).remote(
            cfg.name,
            replica,
            cfg.max_batch,
            cfg.phase_timeout_s,
            ray.get_runtime_context().current_actor,
        )

    def _create_rank(self, rank: int, use_gpu: bool):
        return WeightManagerActor.options(
            name=rank_actor_name(self.config.name, rank),
            namespace=self.config.namespace,
            # Detached, so a restarted coordinator finds its ranks; they still end with
            # their placement group (and so with the driver's job, unless detached). Ray
            # does not restart them: a restart waits forever once the group is gone; a
            # dead rank is created anew when its replica is rebuilt (`_await_alive`).
            lifetime="detached",
            max_restarts=0,
            num_cpus=1,
            num_gpus=self.config.gpus_per_rank if use_gpu else 0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.pgs[rank // self.config.tp], rank % self.config.tp
            ),
            runtime_env={"env_vars": rank_env(self.config, use_gpu)},
        ).remote(self.config.parallel(rank), self.config.load, [ray.put(self._factory)])

    def _replica_ranks(self, replica: int) -> list[int]:
        return self.config.parallel().replica_ranks(replica)

    def _form_replica(self, replica: int, attempts: int = 3) -> None:
        """Wait for the replica's rank processes, then join them into one world.

        A rank process that dies while the world forms (a crash, a killed process) takes
        the whole replica through another try: a paddle world cannot take in a newcomer.
        """
        ranks = self._replica_ranks(replica)
        for attempt in range(1, attempts + 1):
            deadline = time.monotonic() + self.config.phase_timeout_s
            try:
                endpoints = [self._await_alive(r, deadline) for r in ranks]
                # A rank that dies while the world forms leaves its peers waiting for it in
                # paddle's rendezvous: stop at the first failure, the retry restarts them.
                out = self._phase(
                    "setup", lambda a, ep=endpoints: a.setup.remote(ep), ranks, fail_fast=True
                )
                self._nodes.update({rank: info["node"] for rank, info in out.items()})
                self._pids.update({rank: info["pid"] for rank, info in out.items()})
                return
            except RankFailed as e:
                if not e.lost or attempt == attempts:
                    raise
                self.log.warning("replica %d did not form (%s); try %d", replica, e, attempt + 1)
                for rank in ranks:
                    ray.kill(self.ranks[rank], no_restart=False)
                metrics.rank_restart(self.config.name, replica, len(ranks))

    def _await_alive(self, rank: int, deadline: float) -> str:
        while True:
            try:
                left = max(0.1, deadline - time.monotonic())
                return ray.get(self.ranks[rank].get_endpoint.remote(), timeout=left)
            except (*RANK_LOST, ray.exceptions.GetTimeoutError) as e:
                if self._gone_for_good(rank):
                    self.log.warning("rank %d is dead for good; creating it anew", rank)
                    self.ranks[rank] = self._create_rank(rank, bool(self.config.use_gpu))
                if time.monotonic() >= deadline:
                    raise PhaseTimeout(
                        "restart", {rank: f"did not come back: {e}"}, lost=[rank]
                    ) from None
                time.sleep(0.2)

    def _gone_for_good(self, rank: int) -> bool:
        """True when Ray will not restart the rank (its name is free again)."""
        try:
            ray.get_actor(rank_actor_name(self.config.name, rank), self.config.namespace)
            return False
        except ValueError:
            return True

    def shutdown(self) -> None:
        """Kill every rank and remove the placement groups, found by name as well (a
        coordinator that failed to adopt them still takes them down)."""
        cfg = self.config
        names = [rank_actor_name(cfg.name, r) for r in range(self.world)]
        names += [front_actor_name(cfg.name, r) for r in range(cfg.dp)]
        for name in names:
            try:
                ray.kill(ray.get_actor(name, cfg.namespace))
            except ValueError:
                pass
        for actor in [*self.ranks, *self._fronts]:
            ray.kill(actor, no_restart=True)
        self.ranks, self._fronts = [], []
        for replica in range(self.config.dp):
            try:
                remove_placement_group(get_placement_group(_pg_name(self.config.name, replica)))
            except ValueError:
                pass
        self.pgs = []
        self._ok = [False] * self.config.dp


def rank_env(config: FleetConfig, use_gpu: bool) -> dict[str, str]:
    """A rank process's environment: one BLAS thread (the ranks already use every core
    between them); with `gpu_visibility="node"`, Ray leaves CUDA_VISIBLE_DEVICES to the rank
    (`fd_ray_sync.gpus.see_node_gpus`)."""
    env = {"OMP_NUM_THREADS": "1"}
    if use_gpu and config.gpu_visibility == "node":
        env[gpus.NOSET] = "1"
    return env


def _pg_name(fleet: str, replica: int) -> str:
    return f"{fleet}.pg{replica}"


def _spread_targets(dp: int, tp: int, bundle: dict[str, float]) -> list[str | None]:
    """A node to aim each replica at: the alive nodes that can hold a whole replica, taken
    in turn (a soft target: Ray places a replica elsewhere when its node is full)."""
    fits = sorted(
        n["NodeID"]
        for n in ray.nodes()
        if n["Alive"] and all(n["Resources"].get(k, 0) >= v * tp for k, v in bundle.items())
    )
    return [fits[r % len(fits)] if fits else None for r in range(dp)]


class _VersionKey:
    """Orders versions as `is_newer` does (for picking the newest committed one)."""

    def __init__(self, version: str | None):
        self.version = version

    def __lt__(self, other: _VersionKey) -> bool:
        return other.version is not None and is_newer(other.version, self.version)
