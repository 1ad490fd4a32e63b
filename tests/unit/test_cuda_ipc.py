"""The ipc transport over CUDA: what runs without a GPU here, and the GPU run (marked `gpu`).

On CPU: the memory names the spec carries, the bounds a rank checks before it wraps the
trainer's memory, the manager writing torch-tensor chunks (what a CUDA source yields) in
place, `copy_into` from a torch source into paddle and torch parameters, and the Ray-free
fleet-path script over shared memory. On a GPU: the same script over CUDA IPC.
"""

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fd_ray_sync import cuda_ipc
from fd_ray_sync.checksum import digest
from fd_ray_sync.config import LoadConfig, ParallelConfig
from fd_ray_sync.engine.torch_engine import TorchEngine
from fd_ray_sync.errors import PartialUpdateError, WeightMismatchError
from fd_ray_sync.manager import DynamicWeightManager
from fd_ray_sync.messages import TensorMeta
from fd_ray_sync.params import copy_into, wide_pair
from fd_ray_sync.sharding import ShardSpec, take_shard
from fd_ray_sync.sources.base import Chunk, RankContext, WeightSource
from fd_ray_sync.sources.ipc import IpcRingSource, IpcRingSpec, IpcStorageSource, IpcStorageSpec
from fd_ray_sync.tensors import to_host

ROOT = Path(__file__).resolve().parents[2]
HANDLE = bytes(range(64))


def test_a_memory_name_carries_owner_size_and_handle_and_bad_ones_are_refused():
    name = cuda_ipc.encode(4242, 1 << 30, HANDLE)
    assert cuda_ipc.is_cuda_name(name) and not cuda_ipc.is_cuda_name("fd-ray-sync-1-ab-ring0")
    assert cuda_ipc.decode(name) == (4242, 1 << 30, HANDLE)
    with pytest.raises(WeightMismatchError, match="64 bytes, not 3"):
        cuda_ipc.encode(1, 8, b"abc")
    with pytest.raises(WeightMismatchError, match="not a CUDA IPC memory name"):
        cuda_ipc.decode(name[:-2])


def test_a_rank_refuses_a_view_past_the_end_of_the_trainers_allocation():
    segment = cuda_ipc.CudaSegment("x", address=1 << 40, nbytes=4096, device=0)
    with pytest.raises(WeightMismatchError, match="overrun the trainer's 4096-byte allocation"):
        segment.tensor(4000, (64,), "bfloat16")  # refused before anything touches CUDA


def test_a_ring_spec_must_place_every_slot_and_an_empty_registered_tensor_needs_no_memory():
    ctx = RankContext(rank=0, parallel=ParallelConfig(), load=LoadConfig(), plan={})
    with pytest.raises(WeightMismatchError, match="0 slot offsets for 2 slots"):
        IpcRingSource(IpcRingSpec("1", slots=("cuda-ipc-a", "cuda-ipc-b")), ctx)
    empty = TensorMeta(name="e", shape=(0, 4), dtype="bfloat16")
    spec = IpcStorageSpec("1", tensors=(empty,), segments=(cuda_ipc.NO_MEMORY,))
    [(_, chunk)] = list(IpcStorageSource(spec, {}).chunks())  # attaches nothing
    assert chunk["e"][0].shape == (0, 4) and chunk["e"][1] == "bfloat16"


# --- the rank's write path with torch-tensor chunks ------------------------------------------

FULL = {"col": (8, 12), "row": (12, 8), "norm": (8,)}
PLAN = {"col": ShardSpec(axis=1, parts=2, index=1), "row": ShardSpec(axis=0, parts=2, index=1)}


def full_weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {
        n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in FULL.items() if n != "norm"
    }
    out["norm"] = torch.randn(FULL["norm"], generator=g)
    return out


class TorchChunks(WeightSource):
    """A source yielding this rank's slices as torch tensors (strided views), as the ipc
    source does over CUDA; `wrong` names a tensor whose announced checksum is off by one."""

    name = "torch-chunks"

    def __init__(self, full: dict[str, torch.Tensor], wrong: str | None = None):
        self.slices = {n: take_shard(t, PLAN.get(n, ShardSpec())) for n, t in full.items()}
        self.wrong = wrong

    def manifest(self) -> dict[str, TensorMeta]:
        out = {}
        for n, t in self.slices.items():
            host, dtype = to_host(t)
            out[n] = TensorMeta(
                name=n, shape=tuple(t.shape), dtype=dtype, checksum=digest(host) + (n == self.wrong)
            )
        return out

    def chunks(self) -> Iterator[tuple[str, Chunk]]:
        yield "slices", {n: (t, to_host(t)[1]) for n, t in self.slices.items()}


def rank_manager() -> DynamicWeightManager:
    module = torch.nn.Module()
    module.col = torch.nn.Parameter(torch.zeros(8, 6, dtype=torch.bfloat16), requires_grad=False)
    module.row = torch.nn.Parameter(torch.zeros(6, 8, dtype=torch.bfloat16), requires_grad=False)
    module.norm = torch.nn.Parameter(torch.zeros(8), requires_grad=False)
    return DynamicWeightManager(TorchEngine(module, ParallelConfig(), None, PLAN), LoadConfig())


def test_the_manager_writes_torch_tensor_chunks_in_place_and_checks_what_landed():
    m = rank_manager()
    pointers = {n: p.data_ptr() for n, p in m.params.items()}
    full = full_weights(1)
    assert not full["col"][:, 6:].is_contiguous()  # a column split: a strided source
    m.write_prepared(m.prepare_load(TorchChunks(full), "1", check_after_write=True))
    for n, p in m.params.items():
        assert torch.equal(p, take_shard(full[n], PLAN.get(n, ShardSpec()))), n
    assert {n: p.data_ptr() for n, p in m.params.items()} == pointers
    m.verify_parameters("update")  # the checksums it recorded are those of what it holds

    bad = TorchChunks(full_weights(2), wrong="row")
    with pytest.raises(PartialUpdateError, match="'row' does not match its checksum"):
        m.write_prepared(m.prepare_load(bad, "2", check_after_write=True))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("cols", [(2, 7), (4, 12)])  # the second: int64 views (wide_pair)
def test_copy_into_takes_a_strided_torch_source_for_paddle_and_torch_parameters(dtype, cols):
    paddle = pytest.importorskip("paddle")  # the GPU machine runs this file without paddle
    g = torch.Generator().manual_seed(3)
    src = torch.randn(6, 16, generator=g).to(getattr(torch, dtype))[:, cols[0] : cols[1]]
    width = cols[1] - cols[0]
    widened = wide_pair(torch.zeros(6, width, dtype=src.dtype), src)[1].dtype == torch.int64
    assert widened == (cols == (4, 12))
    want = to_host(src)[0]
    t = torch.zeros(6, width, dtype=getattr(torch, dtype))
    p = paddle.zeros([6, width], dtype=dtype)
    for param in (t, p):
        before = param.data_ptr()
        copy_into(param, src, dtype)
        assert param.data_ptr() == before
        np.testing.assert_array_equal(to_host(param)[0], want)


# --- the Ray-free fleet-path script ----------------------------------------------------------


def run_fleet_path(tmp_path: Path, device: str, *args: str, timeout: int) -> dict:
    out = tmp_path / "fleet_path.json"
    cmd = [sys.executable, "-m", "fd_ray_sync.gpucheck.fleet_path", "--device", device]
    proc = subprocess.run(
        [*cmd, *args, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def check_report(report: dict) -> None:
    assert set(report["methods"]) == {
        "registered",
        "registered_unchecked",
        "ring",
        "ring_unchecked",
    }
    for name, method in report["methods"].items():
        assert method["bit_identical"] and method["pointers_kept"], (name, method)


@pytest.mark.parametrize("copies", ["torch", "batched"])  # batched: host chunks copy as before
def test_the_fleet_path_script_runs_over_shared_memory(tmp_path, copies):
    # 4 layers of 512 x 512 bf16 in 1 MiB slots: the ring reuses each slot (backpressure).
    args = ("--layers", "4", "--dim", "512", "--rounds", "2", "--slot-mib", "1")
    report = run_fleet_path(tmp_path, "cpu", *args, "--copies", copies, timeout=240)
    check_report(report)
    assert report["copies"] == copies


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False"
)
@pytest.mark.parametrize("copies", ["torch", "batched"])
def test_gpu_the_fleets_ipc_path_over_cuda_ipc_is_bit_identical_in_place(tmp_path, copies):
    args = ("--layers", "4", "--dim", "2048", "--rounds", "2", "--slot-mib", "16")
    args = (*args, "--copies", copies)
    check_report(run_fleet_path(tmp_path, "cuda:0", *args, timeout=300))
