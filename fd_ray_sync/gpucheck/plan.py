"""The synthetic model, the bucket plans and the checksums: pure functions, tested on CPU."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TP = 2
LAYERS = 90
ALIGN = 256
MiB = 1 << 20
GiB = 1 << 30
VALUE_MASK = 0x3FFF  # bf16 bit patterns 0..0x3FFF are finite and non-negative (0 to ~2.0)
CHECK_CHUNK = 1 << 24  # elements per chunk when checking, to bound temporary memory
NAMES = ("trainer", "rank0", "rank1")
TARGETS = {"ring": 0.45, "ring_hostsync": 0.45, "registered": 0.8, "host": 0.8}
RANK_EXTRA_TARGET_MIB = 64.0
CUDA_METHODS = ("floor", "ring", "ring_hostsync", "registered", "host")
CPU_METHODS = ("floor", "ring", "registered", "host")

# (name, rows, cols in units of h/2, how TP splits it)
LAYER_MATRICES = (
    ("q_proj", 2, 2, "row"),
    ("o_proj", 2, 2, "col"),
    ("kv_proj", 1, 2, "row"),
    ("down_proj", 2, 4, "col"),
    ("gate_up_proj", 4, 2, "row"),
    ("shared_down_proj", 2, 1, "col"),
    ("shared_up_proj", 1, 2, "row"),
    ("router_proj", 2, 1, "col"),
)
LAYER_VECTORS = ("input_layernorm", "post_attention_layernorm")
PER_LAYER = len(LAYER_MATRICES) + len(LAYER_VECTORS)


def max_or_none(values) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    split: str  # "row" | "col" | "rep"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return 2 * self.numel

    def rank_shape(self, tp: int = TP) -> tuple[int, ...]:
        if self.split == "row":
            return (self.shape[0] // tp, self.shape[1])
        if self.split == "col":
            return (self.shape[0], self.shape[1] // tp)
        return self.shape

    def rank_slice(self, full: torch.Tensor, rank: int, tp: int = TP) -> torch.Tensor:
        """Rank ``rank``'s part of ``full`` as a view: contiguous rows, strided columns."""
        if self.split == "row":
            n = self.shape[0] // tp
            return full[rank * n : (rank + 1) * n]
        if self.split == "col":
            n = self.shape[1] // tp
            return full[:, rank * n : (rank + 1) * n]
        return full


def hidden_size(gib: float, layers: int = LAYERS) -> int:
    """h such that 90 layers of 8 h^2 + 2 h bf16 values weigh about ``gib`` GiB (a multiple
    of 16, so that every split of h/2 is whole)."""
    h = math.sqrt(gib * GiB / (layers * 16))
    return max(16, int(round(h / 16)) * 16)


def model_specs(gib: float, layers: int = LAYERS) -> list[TensorSpec]:
    h = hidden_size(gib, layers)
    specs = []
    for layer in range(layers):
        for name, rows, cols, split in LAYER_MATRICES:
            shape = (rows * h // 2, cols * h // 2)
            specs.append(TensorSpec(f"layers.{layer}.{name}.weight", shape, split))
        for name in LAYER_VECTORS:
            specs.append(TensorSpec(f"layers.{layer}.{name}.weight", (h,), "rep"))
    return specs


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def flat_layout(sizes: list[int]) -> tuple[list[int], int]:
    """Aligned offsets of ``sizes`` laid end to end, and the total."""
    offsets, off = [], 0
    for n in sizes:
        off = align(off)
        offsets.append(off)
        off += n
    return offsets, align(off)


def plan_buckets(sizes: list[int], bucket_bytes: int) -> list[list[tuple[int, int]]]:
    """Greedy, in order: bucket -> [(item, offset)], items aligned, none split.

    bucket 0: |item 0|pad|item 1|pad|item 2|          (<= bucket_bytes)
    bucket 1: |item 3|pad|item 4|
    """
    buckets: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    off = 0
    for i, n in enumerate(sizes):
        if n > bucket_bytes:
            raise ValueError(
                f"item {i} of {n} bytes does not fit a bucket of {bucket_bytes} bytes: "
                "raise --bucket-mib"
            )
        start = align(off)
        if current and start + n > bucket_bytes:
            buckets.append(current)
            current, start = [], 0
        current.append((i, start))
        off = start + n
    if current:
        buckets.append(current)
    return buckets


def host_parts(specs: list[TensorSpec], tp: int = TP) -> list[tuple[int, int]]:
    """What the host ring carries: (tensor, rank) for each rank's slice of a split tensor,
    (tensor, -1) once for a replicated one (every rank reads it)."""
    parts = []
    for i, s in enumerate(specs):
        parts.extend([(i, -1)] if s.split == "rep" else [(i, r) for r in range(tp)])
    return parts


def part_shape(spec: TensorSpec, part: int) -> tuple[int, ...]:
    return spec.shape if part < 0 else spec.rank_shape()


def bucket_view(buf: torch.Tensor, offset: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A bfloat16 tensor of ``shape`` at byte ``offset`` of a flat uint8 buffer."""
    n = 2 * math.prod(shape)
    return buf[offset : offset + n].view(torch.bfloat16).view(shape)


def equal_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (NaN-proof), row chunks so that the comparison's temporaries stay small."""
    if tuple(a.shape) != tuple(b.shape):
        return False
    x, y = a.view(torch.int16), b.view(torch.int16)
    step = CHECK_CHUNK if x.dim() == 1 else max(1, CHECK_CHUNK // max(1, x.shape[1]))
    return all(torch.equal(x[i : i + step], y[i : i + step]) for i in range(0, x.shape[0], step))


def checksum(x: torch.Tensor) -> torch.Tensor:
    """Position-weighted sum of the int16 bit patterns (row sums by row index plus column sums
    by column index), as a 0-d int64 tensor on x's device: the same for any layout of the same
    values, different for swapped rows or columns."""
    v2 = x.view(torch.int16)
    if v2.dim() == 1:
        v2 = v2.unsqueeze(0)
    rows, cols = v2.shape
    step = max(1, CHECK_CHUNK // max(1, cols))
    acc = torch.zeros((), dtype=torch.int64, device=x.device)
    colsum = torch.zeros(cols, dtype=torch.int64, device=x.device)
    for r0 in range(0, rows, step):
        v = v2[r0 : r0 + step].to(torch.int64)
        w = torch.arange(r0 + 1, r0 + 1 + v.shape[0], dtype=torch.int64, device=x.device)
        acc += (v.sum(dim=1) * w).sum()
        colsum += v.sum(dim=0)
    w = torch.arange(1, cols + 1, dtype=torch.int64, device=x.device)
    return acc + 3 * (colsum * w).sum()


def combined_checksum(parts: list[torch.Tensor]) -> int:
    total = torch.zeros((), dtype=torch.int64, device=parts[0].device)
    for i, p in enumerate(parts):
        total += checksum(p) * (2 * i + 1)
    return int(total.item())
