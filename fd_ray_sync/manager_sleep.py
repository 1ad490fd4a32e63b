"""Sleep and wake for one rank's weights and KV cache (part of `DynamicWeightManager`).

Level 1 keeps a host copy of every parameter and frees its storage as a clear does; wake
writes the copy back into fresh storage and checks it against the fingerprint taken before
sleeping. Level 2 discards the weights: an update brings them back. See fd_ray_sync.sleep
for the tags and levels, and actors/sleep.py for the fleet's side.
"""

from __future__ import annotations

import time
from typing import Any

from fd_ray_sync.errors import StateError, VerificationError
from fd_ray_sync.params import (
    clear_param,
    empty_device_cache,
    is_initialized,
    offload_param,
    reload_param,
)
from fd_ray_sync.sleep import Tags, deepened, sleep_level, sleep_tags
from fd_ray_sync.status import ModelWeightsStatus


class RankSleep:
    """`sleep`/`wake_up` of a `DynamicWeightManager` (its state: `_asleep`, `_host`,
    `_slept`, with `params`, `engine`, `_status`, `_checksums` and `version`)."""

    @property
    def asleep(self) -> dict[str, int]:
        """Tag -> level of what sleeps; empty when awake (see fd_ray_sync.sleep)."""
        return dict(self._asleep)

    def sleep(self, level: int = 1, tags: Tags = None) -> float:
        """Release this rank's memory without leaving the fleet (no barrier: every rank sleeps
        on its own). `tags`: "weights", "kv_cache" (None: both). Weights at level 1 are copied
        into host memory this rank owns, then their storage is freed as a clear frees it; at
        level 2 they are discarded. The device allocator's free blocks go back. A tag already
        asleep keeps the deeper level. Returns seconds."""
        level, tags = sleep_level(level), sleep_tags(tags)
        start = time.perf_counter()
        if "weights" in tags:
            self._sleep_weights(level)
        if "kv_cache" in tags:
            self.engine.clear_requests()
            self.engine.free_kv_cache()
        self._asleep = deepened(self._asleep, level, tags)
        empty_device_cache(self.params.values())
        seconds = time.perf_counter() - start
        self.log.info("asleep (level %d, %s) in %.3fs", level, ", ".join(tags), seconds)
        return seconds

    def _sleep_weights(self, level: int) -> None:
        current = self._asleep.get("weights")
        if current is not None:  # asleep already: only a level-2 sleep changes anything
            if level == 2 and current == 1:
                self._drop_host_copy()
            return
        if self._status == ModelWeightsStatus.CLEARED:
            return  # nothing loaded (cleared, or discarded): nothing to keep or free
        if self._status != ModelWeightsStatus.NORMAL:
            raise StateError(
                f"rank {self.rank}: cannot sleep while the weights are {self._status.name}"
            )
        self.engine.clear_requests()
        if level == 1:
            # The fingerprint first: wake checks the copy that comes back against it.
            self._slept = (self.fingerprint(), dict(self._checksums))
        else:
            self.version = None
        self._set_status(ModelWeightsStatus.CLEARING)
        host: dict[str, Any] = {}
        try:
            for name, param in self.params.items():
                if level == 1:  # one parameter at a time: the copy costs one tensor extra
                    host[name] = offload_param(param)
                clear_param(param)
        except Exception:
            for name, copy in host.items():  # put back what was already freed
                if not is_initialized(self.params[name]):
                    reload_param(self.params[name], copy)
            self._slept = None
            self._status = ModelWeightsStatus.NORMAL
            raise
        self._checksums = {}
        self._host = host
        self.verify_parameters("clearance")
        self._set_status(ModelWeightsStatus.CLEARED)

    def _drop_host_copy(self) -> None:
        """Level 1 -> 2: the weights' host copy goes; an update must load them."""
        self._host, self._slept, self.version = {}, None, None
        self._asleep = {**self._asleep, "weights": 2}

    def wake_up(self, tags: Tags = None) -> float:
        """Bring back what sleeps among `tags` (None: both); a tag awake is left as it is.

        Weights asleep at level 1 are written back from their host copy into fresh storage
        and must then match the fingerprint they had before sleeping (VerificationError
        otherwise: they are freed again and stay asleep, the copy kept). Weights discarded at
        level 2 have nothing to come back: they stay empty (CLEARED) until an update writes
        them. Returns seconds."""
        tags = sleep_tags(tags)
        start = time.perf_counter()
        if "weights" in tags and "weights" in self._asleep:
            if self._asleep["weights"] == 1 and self._slept is not None:
                self._wake_weights(*self._slept)
            self._asleep.pop("weights")
        if "kv_cache" in tags and "kv_cache" in self._asleep:
            self.engine.alloc_kv_cache()
            self._asleep.pop("kv_cache")
        seconds = time.perf_counter() - start
        self.log.info("woke up %s in %.3fs", ", ".join(tags), seconds)
        return seconds

    def _wake_weights(self, before: str, checksums: dict[str, int]) -> None:
        self._set_status(ModelWeightsStatus.UPDATING)
        try:
            for name, param in self.params.items():
                reload_param(param, self._host[name])
            self.verify_parameters("update")
            after = self.fingerprint()
            if after != before:
                raise VerificationError(
                    f"rank {self.rank}: wake_up wrote back weights with fingerprint {after}, "
                    f"not {before} as they were before sleeping; they stay asleep (host copy kept)"
                )
        except Exception:
            for param in self.params.values():
                if is_initialized(param):
                    clear_param(param)
            self._set_status(ModelWeightsStatus.CLEARED)
            raise
        self._set_status(ModelWeightsStatus.NORMAL)
        self._checksums = checksums  # the same bytes: a later fingerprint reuses them
        self._host, self._slept = {}, None
