"""The trainer side of the direct transports: ranks take the bytes from this trainer's memory,
with no object-store copy.

- ipc (the trainer on the ranks' node): `update_ring` packs buckets into a ring of
  `buckets_in_flight` shared-memory slots (`fd_ray_sync.ipc.BucketRing`, kept on the handle
  and grown when a tensor does not fit), ranks copying out of one while the next is packed;
  `update_registered` lets the ranks copy the trainer's registered tensors in place.
- collective: `update_collective` packs into two private slots of the same ring type and
  broadcasts each along the weight-sync group's chain (`fd_ray_sync.collective`), formed
  once per handle (`trainer_end`).

Each is a fed update (`fd_ray_sync.push.feed_update`). These functions are `Fleet`'s
(`fd_ray_sync.fleet`), split out to keep it short: they take the handle and keep its
transport state on it (`_ring`, `_end`).
"""

from __future__ import annotations

import functools
import math
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import ray

from fd_ray_sync.buckets import BucketMeta
from fd_ray_sync.collective import TrainerEnd, chain_order
from fd_ray_sync.config import FEED_THREADS
from fd_ray_sync.errors import ConfigError
from fd_ray_sync.ipc import BucketRing, Registration, aligned
from fd_ray_sync.messages import UpdateReport
from fd_ray_sync.push import Expected, announce, feed_update, get, get_now, shapes
from fd_ray_sync.sharding import ShardPlan
from fd_ray_sync.sources.collective import SLOTS, CollectiveSpec, extent
from fd_ray_sync.sources.ipc import IpcRingSpec, IpcStorageSpec
from fd_ray_sync.tensors import on_cuda, storage_dtype
from fd_ray_sync.version import validate_version

if TYPE_CHECKING:
    from fd_ray_sync.fleet import Fleet


def update_registered(
    fleet: Fleet,
    registration: Registration,
    version: str | int,
    force: bool,
    verify: bool,
    partial: bool = False,
) -> UpdateReport:
    """Ranks copy straight from the registered tensors. Checks: the trainer hashes each
    rank's slices while the ranks copy (and hash what they wrote); the verify phase
    compares the two as fingerprints, so the trainer's read overlaps the ranks'."""
    version = validate_version(version)
    tensors = registration.tensors()  # where each tensor is; refuses reallocated ones
    spec = IpcStorageSpec(
        version,
        tensors=tuple(tensors),
        segments=tuple(registration.segment_of(t.name) for t in tensors),
        chunk_bytes=fleet.config.load.bucket_bytes,
    )
    checked = verify or fleet.config.load.verify_checksum
    tp_plans = fleet._tp_plans(checked)

    def feed(expect: Expected) -> int:
        if checked:
            expect.add(BucketMeta(index=0, tensors=tuple(registration.tensors(tp_plans))))
        return 0

    fleet._held = []
    report = feed_update(fleet, uuid.uuid4().hex, spec, version, force, checked, feed, partial)
    free_retired(fleet)
    return report


def update_ring(
    fleet: Fleet,
    weights: dict[str, Any],
    version: str | int,
    force: bool,
    tp_plans: list[ShardPlan] | None,
    verify: bool,
    partial: bool = False,
) -> UpdateReport:
    version = validate_version(version)
    ring = ring_for(fleet, weights)
    parts = ring.plan(weights)
    uid = uuid.uuid4().hex
    spec = IpcRingSpec(
        version,
        announced=tuple(announce(weights)),
        feed=fleet.coordinator,
        uid=uid,
        keep=False,
        slots=ring.names,
        slot_offsets=ring.offsets,
    )

    def feed(expect: Expected) -> int:
        fed = []
        for i, names in enumerate(parts):
            if i >= len(ring):  # the slot's last bucket must be written by every rank
                get(fleet.coordinator.feed_wait.remote(uid, i - len(ring)))
            meta = ring.pack(i, [(n, weights[n]) for n in names], tp_plans)
            expect.add(meta)
            fed.append(fleet.coordinator.feed_bucket.remote(uid, meta, [i % len(ring)]))
        for call in fed:
            get(call)
        return len(parts)

    fleet._held = []
    report = feed_update(fleet, uid, spec, version, force, verify, feed, partial)
    free_retired(fleet)
    return report


def ring_for(fleet: Fleet, weights: Mapping[str, Any], shared: bool = True) -> BucketRing:
    """This trainer's ring, allocated on first use and kept; grown (new segments, which
    ranks attach once more) when a tensor does not fit a slot. `shared`: in segments
    the ranks attach (ipc); else private memory the collective transport sends from.
    A GPU fleet (`use_gpu`) fed CUDA tensors shares a ring on their device (CUDA IPC)."""
    largest = max(
        (aligned(math.prod(s) * storage_dtype(d).itemsize) for s, d in shapes(weights)),
        default=0,
    )
    want = max(fleet.config.load.bucket_bytes, largest)
    slots = fleet.config.buckets_in_flight if shared else SLOTS
    device = ring_device(weights) if shared and fleet.config.use_gpu else None
    ring = fleet._ring
    if (
        ring is None
        or ring.slot_bytes < want
        or len(ring) != slots
        or ring.shared != shared
        or ring.device != device
    ):
        new = BucketRing(slots, want, shared, device)
        if ring is not None:  # once the new one exists: a failed allocation keeps the old
            retire(fleet, ring)
        fleet._ring = ring = new
    return ring


def retire(fleet: Fleet, ring: BucketRing) -> None:
    """Free a replaced ring: shared memory at once (ranks' mappings of unlinked segments stay
    valid), device memory after the next update has committed (`free_retired`): CUDA leaves
    it undefined when memory is freed while another process maps it, and by then every rank
    that loaded has dropped its mappings of the old ring (`cuda_ipc.release_others`)."""
    if ring.device is None:
        ring.close()
        return
    free_retired(fleet)
    fleet._retired = ring


def free_retired(fleet: Fleet) -> None:
    if fleet._retired is not None:
        fleet._retired.close()
        fleet._retired = None


def ring_device(weights: Mapping[str, Any]) -> str | None:
    """The CUDA device of the first CUDA tensor in `weights` ("cuda:1"), or None."""
    for tensor in weights.values():
        if on_cuda(tensor):
            return str(tensor.device)
    return None


def update_collective(
    fleet: Fleet,
    weights: dict[str, Any],
    version: str | int,
    force: bool,
    tp_plans: list[ShardPlan] | None,
    verify: bool,
    partial: bool = False,
) -> UpdateReport:
    """Broadcast buckets along the weight-sync group's chain (`fd_ray_sync.collective`):
    two private slots, bucket i+1 packed (and hashed) while bucket i is sent."""
    import torch

    version = validate_version(version)
    world = fleet.config.tp * fleet.config.dp
    if world > FEED_THREADS - 4:  # each rank waits for its next bucket in a feed thread
        raise ConfigError(
            f"the collective transport serves at most {FEED_THREADS - 4} ranks for now "
            f"(the coordinator's feed threads); this fleet has {world}"
        )
    ring = ring_for(fleet, weights, shared=False)
    parts = ring.plan(weights)
    end = trainer_end(fleet)
    # Lost ranks are rebuilt first: the group is formed with the processes that load.
    members = get(fleet.coordinator.sync_members.remote())
    nodes = {int(r): node for r, (node, _) in members.items()}
    pids = {int(r): pid for r, (_, pid) in members.items()}
    info = end.prepare(chain_order(nodes, ray.get_runtime_context().get_node_id()), pids)
    uid = uuid.uuid4().hex
    spec = CollectiveSpec(
        version,
        announced=tuple(announce(weights)),
        feed=fleet.coordinator,
        uid=uid,
        keep=False,
        group=info,
        slot_bytes=ring.slot_bytes,
    )
    closed = functools.partial(get_now, fleet.coordinator.feed_closed, uid)

    def feed(expect: Expected) -> int:
        group = end.joined(closed)
        slots = [torch.from_numpy(slot) for slot in ring.slots]
        # NCCL sends device memory: each packed slot is copied to the trainer's GPU.
        wire = slots if group.device == "cpu" else group.buffers(len(slots), ring.slot_bytes)
        sending: list[list] = [[] for _ in slots]
        fed = []
        for i, names in enumerate(parts):
            k = i % len(slots)
            group.wait_sent(sending[k], closed)  # the slot's last bucket is on its way
            meta = ring.pack(i, [(n, weights[n]) for n in names], tp_plans)
            expect.add(meta)
            fed.append(fleet.coordinator.feed_bucket.remote(uid, meta, [k]))
            n = extent(meta)
            if wire is not slots:
                wire[k][:n].copy_(slots[k][:n])
            sending[k] = group.send(wire[k], n, i)
        for works in sending:
            group.wait_sent(works, closed)
        for call in fed:
            get(call)
        return len(parts)

    fleet._held = []
    try:
        report = feed_update(fleet, uid, spec, version, force, verify, feed, partial)
    except BaseException:
        end.failed()
        raise
    free_retired(fleet)
    return report


def trainer_end(fleet: Fleet) -> TrainerEnd:
    if fleet._end is None:
        fleet._end = TrainerEnd(
            ray.util.get_node_ip_address(),
            "nccl" if fleet.config.use_gpu else "gloo",
            # Inside the phase timeout: a rank waiting on a stalled peer says which one
            # before the coordinator gives up on the phase.
            0.8 * fleet.config.phase_timeout_s,
        )
    return fleet._end
