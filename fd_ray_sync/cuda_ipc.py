"""CUDA IPC for the co-located (ipc) transport: device memory the trainer shares with ranks.

The GPU twin of `fd_ray_sync.shm`, with the same shape: the trainer exports an allocation
once and names it; a rank attaches that name once and keeps the mapping; the transport's
spec carries names and offsets, never tensors (no pickle, no torch reductions).

    trainer   export(tensor) -> (name, offset of the tensor in its allocation)
                 the allocation: the cudaMalloc block holding the tensor (driver
                 cuMemGetAddressRange), shared with cudaIpcGetMemHandle
    name      "cuda-ipc-<pid>-<size>-<128 hex digits of the handle>"
    rank      attach(name).tensor(offset, shape, dtype) -> a torch tensor over the mapping
                 (cudaIpcOpenMemHandle, peer access enabled lazily: another GPU of the
                 node is reached over NVLink/PCIe)

CUDA leaves it undefined when the exporter frees memory that an importer still maps, so
the trainer keeps what it exported alive while ranks may map it: ring slots live as long as
the ring, and a replaced ring one update longer (`fd_ray_sync.push_direct.ring_for`), by
which time every rank that loaded has dropped its mappings; registered tensors are the
trainer's own (a reallocation is refused by `fd_ray_sync.ipc`: register again, and free the
old tensors only after the next update). Ranks drop the mappings a new spec no longer names
(`release_others`) and those of a dead trainer (`sweep`).

Torch's caching allocator must hand out ordinary cudaMalloc blocks: with
`PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` the memory is not IPC-shareable this way
and `export` says so. Needs `cuda.bindings` (`pip install fd-ray-sync[gpu]`).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any

from fd_ray_sync.errors import StateError, WeightMismatchError
from fd_ray_sync.shm import pid_alive

PREFIX = "cuda-ipc-"
NO_MEMORY = ""  # the memory name of a registered tensor with no bytes (its pointer is 0)
_NAME = re.compile(r"cuda-ipc-(\d+)-(\d+)-([0-9a-f]{128})$")
_lock = threading.Lock()
_attached: dict[str, CudaSegment] = {}  # name -> mapping (rank)


def is_cuda_name(name: str) -> bool:
    return name.startswith(PREFIX)


def encode(pid: int, size: int, handle: bytes) -> str:
    if len(handle) != 64:
        raise WeightMismatchError(f"a CUDA IPC handle has 64 bytes, not {len(handle)}")
    return f"{PREFIX}{pid}-{size}-{handle.hex()}"


def decode(name: str) -> tuple[int, int, bytes]:
    """(owner pid, allocation size, handle bytes) of a name made by `encode`."""
    match = _NAME.match(name)
    if match is None:
        raise WeightMismatchError(f"{name[:40]!r}... is not a CUDA IPC memory name")
    return int(match.group(1)), int(match.group(2)), bytes.fromhex(match.group(3))


def _bindings():
    try:
        from cuda.bindings import driver, runtime
    except ImportError as e:
        raise StateError(
            "the ipc transport over CUDA needs the CUDA Python bindings: pip install "
            f"'fd-ray-sync[gpu]' (cuda.bindings did not import: {e})"
        ) from None
    return driver, runtime


def _check(what: str, err: Any) -> None:
    if int(err) != 0:
        raise StateError(f"{what} failed: {err!r}")


def _handle_bytes(handle: Any) -> bytes:
    """The 64 bytes of a `cudaIpcMemHandle_t`, read through its address (cuda-bindings 13.4
    dropped the `reserved` attribute that older releases expose)."""
    import ctypes

    return ctypes.string_at(handle.getPtr(), 64)


def _handle_of(runtime: Any, raw: bytes) -> Any:
    """A `cudaIpcMemHandle_t` holding `raw` (64 bytes), written through its address."""
    import ctypes

    handle = runtime.cudaIpcMemHandle_t()
    ctypes.memmove(handle.getPtr(), raw, 64)
    return handle


def export(tensor: Any, exported: dict[int, str]) -> tuple[str, int]:
    """(name, offset): the allocation holding `tensor`'s data, shared once per allocation
    (`exported`: base address -> name, the caller's record, dropped with what it shares),
    and where the tensor starts in it."""
    import os

    import torch

    driver, runtime = _bindings()
    ptr = tensor.data_ptr()
    with torch.cuda.device(tensor.device):
        # A runtime call first: it makes the device's primary context current on this thread
        # (torch's guard does not when the device already is), which the driver call needs.
        _check("cudaFree(0)", runtime.cudaFree(0)[0])
        err, base, size = driver.cuMemGetAddressRange(ptr)
        _check("cuMemGetAddressRange", err)
        base, size = int(base), int(size)
        name = exported.get(base)
        if name is None or decode(name)[1] != size:
            err, handle = runtime.cudaIpcGetMemHandle(base)
            if int(err) != 0:
                raise StateError(
                    f"cudaIpcGetMemHandle of a {size}-byte allocation failed ({err!r}); the "
                    "ipc transport needs memory from cudaMalloc (unset PYTORCH_CUDA_ALLOC_CONF="
                    "expandable_segments:True in the trainer)"
                )
            exported[base] = name = encode(os.getpid(), size, _handle_bytes(handle))
    return name, ptr - base


@dataclass
class CudaSegment:
    """A rank's mapping of a trainer's allocation (the twin of `shm.Segment`)."""

    name: str
    address: int
    nbytes: int
    device: int

    def tensor(self, offset: int, shape: tuple[int, ...], dtype: str) -> Any:
        """A torch tensor of `dtype` and `shape` at `offset` in the mapping (no copy)."""
        import math

        import torch

        from fd_ray_sync.tensors import storage_dtype

        nbytes = math.prod(shape) * storage_dtype(dtype).itemsize
        if offset < 0 or offset + nbytes > self.nbytes:
            raise WeightMismatchError(
                f"{nbytes} bytes at offset {offset} overrun the trainer's {self.nbytes}-byte "
                "allocation: the spec does not match the memory it names"
            )
        address = self.address + offset
        raw = torch.as_tensor(_Interface(address, nbytes), device=f"cuda:{self.device}")
        if nbytes and raw.data_ptr() != address:  # torch copied instead of wrapping
            raise StateError(
                f"torch {torch.__version__} copied the trainer's memory instead of wrapping it "
                "(__cuda_array_interface__); the ipc transport needs a torch that wraps it"
            )
        return raw.view(getattr(torch, dtype)).view(shape)

    def close(self) -> None:
        import torch

        _, runtime = _bindings()
        with torch.cuda.device(self.device):
            _check("cudaIpcCloseMemHandle", runtime.cudaIpcCloseMemHandle(self.address)[0])


class _Interface:
    """`__cuda_array_interface__` of raw bytes, so torch wraps them without owning them."""

    def __init__(self, address: int, nbytes: int):
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (address, False),
            "version": 3,
            "strides": None,
            "stream": None,  # the caller orders the copies (see fd_ray_sync.sources.ipc)
        }


def attach(name: str) -> CudaSegment:
    """This process's mapping of `name` on its current CUDA device, opened once and kept."""
    import torch

    with _lock:  # held while opening: two threads never open the same handle twice
        segment = _attached.get(name)
        if segment is not None:
            return segment
        _, runtime = _bindings()
        owner, size, raw = decode(name)
        if not pid_alive(owner):
            raise StateError(f"the trainer (pid {owner}) that shared {name[:30]}... is gone")
        device = torch.cuda.current_device()
        with torch.cuda.device(device):
            err, address = runtime.cudaIpcOpenMemHandle(
                _handle_of(runtime, raw), runtime.cudaIpcMemLazyEnablePeerAccess
            )
        if int(err) != 0:
            raise StateError(
                f"cudaIpcOpenMemHandle of the trainer's memory (pid {owner}) failed on CUDA "
                f"device {device} ({err!r}): the trainer must run on this node, on this GPU or "
                "a peer of it that this process sees (a Ray GPU rank sees only its own GPU "
                "unless the fleet is launched with FleetConfig(gpu_visibility='node'))"
            )
        segment = _attached[name] = CudaSegment(name, int(address), size, device)
        return segment


def release(names: set[str] | None = None) -> None:
    """Close this process's mappings of `names` (all when None); every one is tried, the
    first failure raised after."""
    with _lock:
        gone = [n for n in _attached if names is None or n in names]
        segments = [_attached.pop(n) for n in gone]
    failed = None
    for segment in segments:
        try:
            segment.close()
        except StateError as e:
            failed = failed or e
    if failed is not None:
        raise failed


def release_others(keep: set[str]) -> None:
    """Close the mappings of memory whose owners are in `keep`'s names but which `keep` does
    not name (a grown ring, tensors registered again) and those of dead owners."""
    owners = {decode(n)[0] for n in keep if is_cuda_name(n)}
    with _lock:
        stale = {
            n
            for n in _attached
            if n not in keep and (decode(n)[0] in owners or not pid_alive(decode(n)[0]))
        }
    release(stale)


def sweep() -> None:
    """Close the mappings of memory whose owner died (a trainer killed mid-update): the
    mapping alone would keep that memory from the driver."""
    with _lock:
        dead = {n for n in _attached if not pid_alive(decode(n)[0])}
    if dead:
        release(dead)
