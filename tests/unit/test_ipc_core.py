"""The co-located transport's trainer side and its shared-memory segments, without Ray."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from fd_ray_sync import ipc, shm
from fd_ray_sync.buckets import slice_checksums
from fd_ray_sync.errors import StateError, WeightMismatchError
from fd_ray_sync.sharding import REPLICATED, ShardSpec, take_shard
from fd_ray_sync.sources.ipc import IpcStorageSource, IpcStorageSpec, _view


def plans():
    """Two TP ranks: "w" split by rows, "v" by columns, "b" replicated."""
    return [
        {"w": ShardSpec(axis=0, parts=2, index=r), "v": ShardSpec(axis=1, parts=2, index=r)}
        for r in range(2)
    ]


def weights(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((64, 48), dtype=np.float32),
        "v": rng.standard_normal((40, 32), dtype=np.float32),
        "b": rng.standard_normal(7, dtype=np.float32),
        "s": np.asarray(1.5, dtype=np.float32),  # 0-d
    }


def test_a_ring_packs_aligned_and_checksums_each_ranks_slice_as_it_copies():
    ring = ipc.BucketRing(2, 1 << 14)
    try:
        w = weights()
        parts = ring.plan(w)
        assert [n for p in parts for n in p] == list(w)
        reader = [shm.attach(name) for name in ring.names]  # as a rank would
        for i, names in enumerate(parts):
            meta = ring.pack(i, [(n, w[n]) for n in names], plans())
            for t in meta.tensors:
                assert t.offset % shm.ALIGN == 0
                got = _view(reader[i % 2], t)
                np.testing.assert_array_equal(got, w[t.name])
                specs = [p.get(t.name, REPLICATED) for p in plans()]
                assert t.slice_checksums == slice_checksums(w[t.name], specs)
        names = ring.names
    finally:
        ring.close()
        shm.release()
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in names)


def test_a_tensor_bigger_than_a_slot_is_refused_by_name():
    ring = ipc.BucketRing(2, 1024)
    try:
        with pytest.raises(WeightMismatchError, match="'w'.*does not fit a ring slot"):
            ring.plan(weights())
    finally:
        ring.close()


def test_registered_storage_is_read_in_place_and_a_reallocation_is_refused_by_name():
    shared = ipc.share(weights())
    reg = ipc.Registration(shared)
    tensors = reg.tensors(plans())
    spec = IpcStorageSpec(
        "1", tensors=tuple(tensors), segments=tuple(reg.segment_of(t.name) for t in tensors)
    )
    plan = plans()[1]
    source = IpcStorageSource(spec, plan)
    shared["w"] += 1  # the trainer trains in place: the ranks see it without a copy
    ((_, chunk),) = list(source.chunks())
    np.testing.assert_array_equal(chunk["w"][0], take_shard(shared["w"], plan["w"]))
    np.testing.assert_array_equal(chunk["v"][0], take_shard(shared["v"], plan["v"]))
    assert chunk["s"][0].shape == ()
    shared["v"] = np.zeros_like(shared["v"])  # a new allocation, outside shared memory
    with pytest.raises(StateError, match="v was reallocated.*register the weights again"):
        reg.tensors(plans())
    with pytest.raises(WeightMismatchError, match="'v' is not in shared memory"):
        ipc.Registration(shared)
    shm.release()


def test_torch_tensors_shared_by_share_keep_their_dtype_and_are_registrable():
    state = {"a": torch.randn(8, 4).to(torch.bfloat16), "b": torch.arange(6.0)}
    shared = ipc.share(state)
    assert shared["a"].dtype == torch.bfloat16 and torch.equal(shared["a"], state["a"])
    module = torch.nn.Linear(4, 3)
    module.load_state_dict(ipc.share(module.state_dict()), assign=True)
    reg = ipc.Registration(module)  # a module is read again at each update
    with torch.no_grad():
        module.weight.add_(1.0)  # in place: still registered
    assert len(reg.tensors()) == 2
    module.weight = torch.nn.Parameter(torch.zeros(3, 4))  # reallocated
    with pytest.raises(StateError, match="weight was reallocated"):
        reg.tensors()


def test_attaching_a_segment_of_another_node_names_the_cause():
    with pytest.raises(StateError, match="needs the trainer on the ranks' node"):
        shm.attach(f"fdrs-{os.getpid()}-abcdef-ring0")


def test_a_sigkilled_owner_leaves_segments_that_the_next_sweep_removes():
    code = (
        "import sys, time; from fd_ray_sync import shm; s = shm.create('ring0', 4096); "
        "print(s.name, flush=True); time.sleep(60)"
    )
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    name = owner.stdout.readline().strip()
    attached = shm.attach(name)
    assert attached.nbytes == 4096
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    assert os.path.exists(f"/dev/shm/{name}")  # a SIGKILL runs no cleanup
    assert name in shm.sweep()
    assert not os.path.exists(f"/dev/shm/{name}") and shm.segments_of(owner.pid) == []
    assert name not in shm._attached  # the stale mapping is gone


def test_a_mapping_of_a_segment_its_owner_unlinked_is_dropped_by_the_next_sweep():
    ring = ipc.BucketRing(2, 4096)  # e.g. a ring replaced by a bigger one
    names = ring.names
    for name in names:
        shm.attach(name)
    ring.close()
    shm.sweep()
    assert not set(names) & set(shm._attached)
