"""Checks shared by the fleet tests: what every rank must hold, a rank killed mid-write,
other handles on a fleet, and weights cut into sharded trainers' pieces."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Mapping

import numpy as np
import ray

from fd_ray_sync.checksum import fingerprint
from fd_ray_sync.errors import RankFailed
from fd_ray_sync.sharding import take_shard
from fd_ray_sync.shards import Shard, ShardSet, put_shards


def expected_fingerprints(fleet, state):
    return {
        rank: fingerprint(
            (n, "float32", take_shard(np.asarray(a), plan[n])) for n, a in state.items()
        )
        for rank, plan in fleet.shard_plans().items()
    }


def assert_serves(fleet, state, version):
    """Every rank holds `state`'s slices at `version`, and generation says so."""
    status = fleet.status()
    assert status["version"] == str(version) and all(status["replicas_serving"]), status
    for r in status["ranks"]:
        assert (r["weights"], r["version"]) == ("NORMAL", str(version)), r
    got = {r["rank"]: r["fingerprint"] for r in status["ranks"]}
    # A fingerprint is refreshed by verify; a rebuilt rank has one from its restore.
    assert got == expected_fingerprints(fleet, state)
    for replica in range(fleet.config.dp):
        assert fleet.generate(["x"], 4, replica=replica)[0].version == str(version)


def kill_rank0_mid_write(fleet, tmp_path, push: Callable[[], object]) -> list[RankFailed]:
    """Run `push` (an update) in a thread, SIGKILL rank 0 after its fifth parameter write
    (half of its weights new), and return the RankFailed errors the push raised."""
    victim = fleet.status()["ranks"][0]
    rank0 = ray.get(fleet.coordinator.rank_handles.remote())[0]
    marker = tmp_path / "mid-write"
    ray.get(rank0.hold_after_writes.remote(5, str(marker)))  # rank 0 stops after 5 writes
    errors = []

    def run():
        try:
            push()
        except RankFailed as e:
            errors.append(e)

    pusher = threading.Thread(target=run)
    pusher.start()
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert time.monotonic() < deadline, "rank 0 never reached its fifth write"
        time.sleep(0.05)
    os.kill(victim["pid"], signal.SIGKILL)
    pusher.join(timeout=120)
    return errors


def over_object_store(fleet):
    """Another handle on the same fleet that pushes through the object store (the
    committed version is then kept for restores)."""
    from fd_ray_sync.fleet import Fleet

    load = fleet.config.load.model_copy(update={"load_strategy": "object_store"})
    return Fleet(fleet.coordinator, fleet.config.model_copy(update={"load": load}))


def over(fleet, strategy: str):
    """Another handle on the same ranks that pushes with `strategy`."""
    from fd_ray_sync.fleet import Fleet

    load = fleet.config.load.model_copy(update={"load_strategy": strategy})
    return Fleet(fleet.coordinator, fleet.config.model_copy(update={"load": load}))


def close(handle) -> None:
    """What the handle's transport holds in this process (the ring, the group); the ranks
    and the coordinator stay up for the next test."""
    for held in (handle._ring, handle._end):
        if held is not None:
            held.close()


def put_in_pieces(state: Mapping[str, np.ndarray], bucket_bytes: int = 32 << 10) -> list[ShardSet]:
    """`state` as two sharded trainers put it: each parameter cut at a third (never the
    fleet's TP split), by rows where it has three or more, else as flat ranges, and each
    trainer's pieces put under its own id (by this process, which holds both here)."""
    pieces: list[dict[str, Shard]] = [{}, {}]
    for name, array in state.items():
        shape = array.shape
        by_rows = len(shape) >= 2 and shape[0] >= 3
        n = shape[0] if by_rows else array.size
        for k, (lo, hi) in enumerate([(0, n // 3), (n // 3, n)]):
            if lo == hi:
                continue
            if by_rows:
                pieces[k][name] = Shard(array[lo:hi], shape, axis=0, start=lo)
            else:
                pieces[k][name] = Shard(array.reshape(-1)[lo:hi], shape, flat=True, start=lo)
    return [put_shards(p, trainer=k, bucket_bytes=bucket_bytes) for k, p in enumerate(pieces)]
