"""Process groups of one rank: joining its replica's world, and the TP/EP groups' lifecycle.

Each replica is its own paddle world of `tp` processes (as FastDeploy runs each data-parallel
group): replicas never run collectives together, and a replica whose rank died is rebuilt
without touching the others. Ranks inside a world are numbered by their TP rank.

Gloo groups have no shutdown()/restart() in paddle (NCCL groups do). Tearing a gloo group
down means destroying it and creating it again with `new_group`, so this module hides the
difference behind `shutdown()` / `restart()`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Literal

from fd_ray_sync.config import ParallelConfig
from fd_ray_sync.errors import StateError
from fd_ray_sync.log import get_logger


def init_world(parallel: ParallelConfig, endpoints: Sequence[str]) -> None:
    """Join this rank's replica world: `endpoints` are the replica's ranks ("host:port"
    each, in TP-rank order).

    Paddle reads its launch contract from environment variables; this is the one place
    fd-ray-sync sets them. Must run before any other paddle.distributed call.
    """
    if len(endpoints) != parallel.tp:
        raise StateError(
            f"rank {parallel.rank}: {len(endpoints)} endpoints given for a replica of "
            f"{parallel.tp} ranks"
        )
    me = parallel.tp_rank
    os.environ.update(
        PADDLE_TRAINER_ID=str(me),
        PADDLE_TRAINERS_NUM=str(parallel.tp),
        PADDLE_TRAINER_ENDPOINTS=",".join(endpoints),
        PADDLE_CURRENT_ENDPOINT=endpoints[me],
        PADDLE_MASTER=endpoints[0],
        PADDLE_RANK_IN_NODE=str(me),
        PADDLE_DISTRI_BACKEND=parallel.backend,
    )
    if parallel.tp > 1:  # a replica of one rank has no group: paddle is not needed for it
        import paddle.distributed as dist

        dist.init_parallel_env()


class CommGroups:
    """The TP and EP groups of one rank, with one lifecycle for gloo and NCCL.

    With `tp == 1` there are no groups and every operation is a no-op.
    """

    def __init__(self, parallel: ParallelConfig):
        self.parallel = parallel
        self.timeout = timedelta(seconds=parallel.collective_timeout_s)
        self.tp_group = None
        self.ep_group = None
        self._up = False
        self._log = get_logger(__name__, parallel.rank)

    @property
    def up(self) -> bool:
        return self._up

    @property
    def distributed(self) -> bool:
        return self.parallel.tp > 1

    def start(self) -> None:
        """Create this rank's TP group (tp > 1) and EP group (expert parallel on)."""
        if self._up:
            return
        if self.distributed:
            self._create_groups()
        self._up = True

    def _create_groups(self) -> None:
        import paddle.distributed as dist

        p = self.parallel
        backend = "nccl" if p.backend == "nccl" else None
        ranks = list(range(p.tp))  # numbered inside the replica's world
        self.tp_group = dist.new_group(ranks, backend=backend, timeout=self.timeout)
        if p.enable_expert_parallel:
            self.ep_group = dist.new_group(ranks, backend=backend, timeout=self.timeout)

    def barrier(self, kind: str) -> None:
        """Barrier over the TP ("tp") or EP ("ep") group; no-op when the group does not exist."""
        group = self._group(kind)
        if group is not None:
            import paddle.distributed as dist

            dist.barrier(group)

    def _group(self, kind: str):
        if kind not in ("tp", "ep"):
            raise ValueError(f"unknown group kind {kind!r}; known: 'tp', 'ep'")
        if not self._up and self.distributed:
            raise StateError(f"{kind.upper()} group is shut down; restart it first")
        return getattr(self, f"{kind}_group")

    def shutdown(self) -> None:
        """Tear the TP and EP groups down (NCCL: shutdown; gloo: destroy)."""
        if not self._up:
            return
        for kind in ("ep", "tp"):
            group = getattr(self, f"{kind}_group")
            if group is None:
                continue
            import paddle.distributed as dist

            if self.parallel.backend == "nccl":
                dist.shutdown_process_group(group)
            else:
                dist.destroy_process_group(group)
        if self.parallel.backend == "gloo":
            self.tp_group = self.ep_group = None
        self._up = False
        self._log.debug("communication groups shut down")

    def restart(self) -> None:
        """Bring the groups back after `shutdown()` (NCCL: restart; gloo: create again)."""
        if self._up:
            return
        if self.parallel.backend == "nccl" and self.distributed:
            import paddle.distributed as dist

            for group in (self.tp_group, self.ep_group):
                if group is not None:
                    dist.restart_process_group(group)
            self._up = True
        else:
            self.start()
        self._log.debug("communication groups restarted")


class GroupAllReduce:
    """Sums a tensor in place over this rank's TP or EP group (identity when `size == 1`).

    The group is looked up on every call, never stored: restarting the communication groups
    destroys them and creates new ones.
    """

    def __init__(self, groups: CommGroups | None, kind: Literal["tp", "ep"], size: int):
        self.groups, self.kind, self.size = groups, kind, size

    def __call__(self, x: Any) -> Any:
        """`x`: a paddle tensor (the reference engine; the torch one converts to it)."""
        if self.size == 1:
            return x
        import paddle.distributed as dist

        group = getattr(self.groups, f"{self.kind}_group", None)
        if group is None:
            rank = self.groups.parallel.rank if self.groups is not None else "?"
            raise StateError(
                f"rank {rank}: the {self.kind.upper()} group (size {self.size}) is not up; "
                "start or restart the communication groups before a forward pass"
            )
        dist.all_reduce(x, group=group)
        return x
