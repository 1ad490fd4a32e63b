"""What every `fd-ray-sync bench` method shares: the synthetic model and its expected
slices (`Setup`), the warm-up count, the memcpy floor, and draining the object store."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import ray

from fd_ray_sync.checksum import fingerprint
from fd_ray_sync.engine.synthetic import synthetic_plan, synthetic_shapes, synthetic_weights
from fd_ray_sync.ray_stats import object_store_bytes_used
from fd_ray_sync.sharding import take_shard

GB = 1e9
# Two warm-up runs: with the rollback copy kept, the second update is the first to touch a
# second model's worth of fresh object-store pages (3 s of page faults for 1 GiB here).
WARMUP = 2

# A method's runner calls it after each of its rounds (warm-ups included) with the number
# done: `run_bench` turns it into `on_progress(done, total, label)` for a progress bar.
OnRound = Callable[[int], None]


def no_round(done: int) -> None:
    pass


def memcpy_gbps(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Best-of-`repeats` single-core copy bandwidth between two touched host buffers."""
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    return nbytes / best / GB


def _timed(fn: Callable) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def wait_store_drained(limit: int, timeout_s: float = 60.0) -> None:
    """Wait until the object store holds at most `limit` bytes (Ray frees asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while object_store_bytes_used() > limit and time.monotonic() < deadline:
        time.sleep(0.05)


class Setup:
    """The synthetic model and what each rank must end up holding."""

    def __init__(self, size_gb: float, tp: int, dp: int, keep_committed: bool = True):
        self.keep_committed = keep_committed
        self.total_bytes = int(size_gb * (1 << 30))
        self.tp, self.dp = tp, dp
        self.shapes = synthetic_shapes(self.total_bytes)
        self.model_bytes = sum(int(np.prod(s)) * 4 for s in self.shapes.values())
        self.plans = {r: synthetic_plan(self.shapes, tp, r % tp) for r in range(tp * dp)}
        self.share_bytes = {
            r: sum(int(np.prod(plan[n].local_shape(s))) * 4 for n, s in self.shapes.items())
            for r, plan in self.plans.items()
        }

    def weights(self, seed: int):
        return synthetic_weights(self.shapes, seed)

    def expected_fingerprints(self, seed: int) -> dict[int, str]:
        by_tp = {}
        for r in range(self.tp):
            plan = self.plans[r]
            by_tp[r] = fingerprint(
                (n, "float32", take_shard(a, plan[n])) for n, a in self.weights(seed)
            )
        return {r: by_tp[r % self.tp] for r in self.plans}

    def holds(self, ranks: list, seed: int) -> bool:
        """Every rank actor (with a `fingerprint()` method) holds seed `seed`'s slices."""
        got = dict(enumerate(ray.get([r.fingerprint.remote() for r in ranks])))
        return got == self.expected_fingerprints(seed)

    def floor_s(self, gbps: float) -> float:
        return (self.model_bytes + sum(self.share_bytes.values())) / (gbps * GB)
