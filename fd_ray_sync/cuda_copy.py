"""One kernel launch for many device copies: a batched 2-D copy. The GPU check uses it for
a bucket's copies (``python -m fd_ray_sync.gpucheck --copies batched``), a rank for each
chunk it copies out of a trainer's device memory (`LoadConfig.device_copies="batched"`).

A bucket's copies are many tensors of a few MiB each, contiguous (row splits, whole tensors)
or strided (column splits: rows of a few KiB at a pitch). Launched one by one, even replayed
from a CUDA graph, each copy pays a launch's start and tail (one CUDA graph of 1,800 copies ran
at 0.70x of one flat copy of the same bytes, H200). Here every copy is cut into tiles of about
``TILE_BYTES`` (a run of rows), described in a table on the device, and one kernel copies every
tile, a block per tile, in 16-byte words. The kernel is compiled at run time with NVRTC and
launched through the CUDA driver API (``cuda.bindings``), on torch's current stream, so that it
is captured into the bucket's CUDA graph like any other launch (`fd_ray_sync.cuda_kernels`).

A copy the kernel cannot take (a row width, pitch or address not a multiple of 16 bytes) stays
a torch copy in the same graph.
"""

from __future__ import annotations

import numpy as np
import torch

from fd_ray_sync import cuda_kernels

TILE_BYTES = 128 << 10
CHUNK = 64 << 10  # a contiguous copy is cut into rows of this many bytes (its tail: one row)
THREADS = 256
WORD = 16

SOURCE = r"""
struct Tile { unsigned long long src, dst, spitch, dpitch; unsigned int rows, vecs; };
extern "C" __global__ void __launch_bounds__(256) batched_copy(const Tile* __restrict__ tiles) {
  const Tile t = tiles[blockIdx.x];
  const unsigned int total = t.rows * t.vecs;
  for (unsigned int k0 = threadIdx.x; k0 < total; k0 += 4 * blockDim.x) {
    int4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const unsigned int k = k0 + u * blockDim.x;
      if (k < total) {
        const unsigned int r = k / t.vecs, i = k - r * t.vecs;
        v[u] = reinterpret_cast<const int4*>(t.src + r * t.spitch)[i];
      }
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const unsigned int k = k0 + u * blockDim.x;
      if (k < total) {
        const unsigned int r = k / t.vecs, i = k - r * t.vecs;
        reinterpret_cast<int4*>(t.dst + r * t.dpitch)[i] = v[u];
      }
    }
  }
}
"""

TILE_DTYPE = np.dtype(
    [
        ("src", "<u8"),
        ("dst", "<u8"),
        ("spitch", "<u8"),
        ("dpitch", "<u8"),
        ("rows", "<u4"),
        ("vecs", "<u4"),
    ]
)
assert TILE_DTYPE.itemsize == 40


def available(log=None) -> bool:
    """Whether the kernel builds in this process (tried once; `log` gets one warning if not)."""
    return cuda_kernels.available(SOURCE, "batched_copy", "copying tensor by tensor", log)


def _geometry(dst: torch.Tensor, src: torch.Tensor):
    """(rows, row bytes, src pitch, dst pitch) of a copy, or None if the kernel cannot take it."""
    es = src.element_size()
    if dst.element_size() != es or tuple(dst.shape) != tuple(src.shape):
        return None
    if src.is_contiguous() and dst.is_contiguous():
        return (1, src.numel() * es, 0, 0)
    if src.dim() != 2 or src.stride(1) != 1 or dst.stride(1) != 1:
        return None
    return (src.shape[0], src.shape[1] * es, src.stride(0) * es, dst.stride(0) * es)


def _row_tiles(dst: int, src: int, rows: int, width: int, spitch: int, dpitch: int) -> list:
    per = max(1, TILE_BYTES // width)
    return [
        (src + r * spitch, dst + r * dpitch, spitch, dpitch, min(per, rows - r), width // WORD)
        for r in range(0, rows, per)
    ]


def plan_tiles(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[np.ndarray, list]:
    """The tile table of ``pairs`` (destination, source), and the pairs the kernel cannot take.
    Pure: the table is only addresses and sizes (tested on CPU by replaying it with memmove)."""
    tiles, rest = [], []
    for dst, src in pairs:
        g = _geometry(dst, src)
        d, s = dst.data_ptr(), src.data_ptr()
        if g is None or g[1] == 0 or any(v % WORD for v in (*g[1:], d, s)):
            rest.append((dst, src))
            continue
        rows, width, spitch, dpitch = g
        if spitch == 0:  # contiguous: rows of CHUNK bytes, then the tail as one row
            full = width // CHUNK
            tiles += _row_tiles(d, s, full, CHUNK, CHUNK, CHUNK) if full else []
            tail = width - full * CHUNK
            if tail:
                o = full * CHUNK
                tiles.append((s + o, d + o, tail, tail, 1, tail // WORD))
        else:
            tiles += _row_tiles(d, s, rows, width, spitch, dpitch)
    return np.array(tiles, dtype=TILE_DTYPE), rest


class BatchedCopy:
    """The copies of one bucket as one kernel launch (plus torch copies for any it cannot take)."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device):
        self.func = cuda_kernels.load(SOURCE, "batched_copy")
        table, self.rest = plan_tiles(pairs)
        self.n = len(table)
        self.table = torch.from_numpy(table.view(np.uint8)).to(device)  # kept: the graph reads it

    def launch(self) -> None:
        if self.n:
            cuda_kernels.launch(self.func, self.n, THREADS, self.table.data_ptr())
        for dst, src in self.rest:
            dst.copy_(src, non_blocking=True)
