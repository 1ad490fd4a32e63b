"""CoordinatorActor: a named actor that owns a fleet's ranks and runs its transactions.

Every phase of an update is one round of remote calls on all ranks joined with a timeout,
so the join is the barrier; nothing polls. One writer at a time: the actor runs one method
at a time (status questions have their own concurrency group). Generation requests never
pass through it: each replica's front (`actors/front.py`) serves them, and the coordinator
closes a front's gate before it touches that replica's ranks and opens it after, so a
request waits for a running update to commit or abort and never sees two versions.

Failures: any error, timeout or dead rank aborts the update on every rank. Replicas with a
dead or hung rank are rebuilt (their rank processes replaced, their world and groups
formed again) and load the committed version; replicas whose ranks wrote nothing resume,
the others roll back to it. Rank actors and the placement groups are named, so a restarted
coordinator finds them and rebuilds its state from what the ranks report.

The actor is one class made of three plain mixins, one per concern: `PlacementMixin`
(`actors/placement.py`: placing, rebuilding, adopting and shutting down ranks),
`TransactionMixin` (`actors/transaction.py`: the phases of an update and the pipelined
feed) and `ServingMixin` (`actors/serving.py`: the replicas' fronts and gates, status,
clear). Their state is
created here, in `__init__`; the mixins only read and change it.
"""

from __future__ import annotations

import logging
import threading

import ray

from actors.feeding import TRAINER_POLL_S, FeedMixin
from actors.placement import PlacementMixin, rank_actor_name
from actors.recovery import RecoveryMixin
from actors.serving import ServingMixin
from actors.sleep import SleepMixin
from actors.transaction import TransactionMixin
from actors.weight_manager import EngineFactory
from fd_ray_sync.config import FEED_THREADS, FleetConfig
from fd_ray_sync.feed import BucketFeed
from fd_ray_sync.log import get_logger
from fd_ray_sync.sources import TransportSpec

__all__ = ["TRAINER_POLL_S", "CoordinatorActor", "rank_actor_name"]


@ray.remote(num_cpus=0, max_restarts=-1, concurrency_groups={"status": 1, "feed": FEED_THREADS})
class CoordinatorActor(
    SleepMixin, PlacementMixin, RecoveryMixin, FeedMixin, TransactionMixin, ServingMixin
):
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
        self._fronts: list = []  # replica -> its ReplicaFrontActor (actors/front.py)
        self._paused: str | None = None  # a user's pause mode, until resume_serving
        self._behind: set[int] = set()  # rolling: replicas still on the previous version
        self._nodes: dict[int, str] = {}  # rank -> the node it runs on
        self._pids: dict[int, int] = {}  # rank -> the process set up (a restart changes it)
        self._fingerprints: dict[int, str | None] = {}  # rank -> committed fingerprint
        self._down: dict[int, str] = {}  # replica -> why it does not serve
        self.restore_s: dict[int, float] = {}  # replica -> its last restore's load, seconds
        # (version, replica, its export): the rollback copy of a version the transport kept
        # nothing of (ipc, collective); see _make_rollback_copy.
        self._keep: tuple[str, int, dict] | None = None
        self._feeds: dict[str, BucketFeed] = {}
        self._feeds_lock = threading.Lock()
        self._running_phase: str | None = None  # set while an update's phase runs
        self._adopt()
