"""The small interface an inference engine offers to the weight manager and the fleet.

A user's own engine plugs in by subclassing `InferenceEngine`: hand over the models whose
parameters are managed, say which slice of each full parameter this rank holds, and free /
re-allocate the KV cache on request. Hooks a given engine does not need keep their no-op
defaults, so callers never branch on the engine's type.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from fd_ray_sync.comm import CommGroups
from fd_ray_sync.config import ParallelConfig
from fd_ray_sync.errors import ConfigError
from fd_ray_sync.sharding import ShardSpec
from fd_ray_sync.status import KVCacheStatus


class InferenceEngine(ABC):
    """One rank's engine. Subclasses set `parallel` and `groups` in their constructor."""

    parallel: ParallelConfig
    groups: CommGroups

    @abstractmethod
    def models(self) -> list:
        """The models whose state-dict tensors the manager captures and writes in place:
        paddle Layers (`state_dict()`) or torch Modules (`state_dict(keep_vars=True)`)."""

    @abstractmethod
    def shard_plan(self) -> dict[str, ShardSpec]:
        """Parameter name -> the slice of the full parameter this rank holds."""

    @abstractmethod
    def full_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter name -> shape of the full (unsharded) parameter."""

    @abstractmethod
    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int,
        stop: Callable[[], bool] | None = None,
    ) -> list[str]:
        """Greedy generation; every TP rank of a replica must be called with the same input.

        `stop` (optional to honour): asked while generating; an engine that honours it ends
        early on every TP rank at the same step once any rank's `stop()` is true (the
        caller drops what comes back). One that does not simply runs to the end."""

    def _join_groups(self, parallel: ParallelConfig | None, groups: CommGroups | None) -> None:
        """Set `parallel` and `groups` (either may be derived from the other) and bring the
        groups up; groups built for another layout are refused."""
        self.parallel = parallel or (groups.parallel if groups else ParallelConfig())
        self.groups = groups or CommGroups(self.parallel)
        if self.groups.parallel != self.parallel:
            raise ConfigError(
                f"rank {self.parallel.rank}: groups were built for {self.groups.parallel!r}, "
                f"the engine for {self.parallel!r}"
            )
        if not self.groups.up:
            self.groups.start()

    # --- hooks with no-op defaults -------------------------------------------------------

    @property
    def kv_cache_status(self) -> KVCacheStatus:
        return KVCacheStatus.NORMAL

    def clear_requests(self) -> None:
        """Drop queued and in-flight requests and any prefix cache."""

    def free_kv_cache(self) -> None:
        """Release KV-cache memory (status CLEARED)."""

    def alloc_kv_cache(self) -> None:
        """Re-allocate the KV cache (status NORMAL)."""

    def clear_ep_buffer(self) -> None:
        """Release the expert-parallel communication buffer (DeepEP's, in FastDeploy)."""

    def recreate_ep_buffer(self) -> None:
        """Allocate the expert-parallel communication buffer again."""
