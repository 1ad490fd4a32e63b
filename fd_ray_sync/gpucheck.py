"""One-GPU check of the co-located (``ipc``) transport, runnable on a bare GPU machine.

    python fd_ray_sync/gpucheck.py                    # anywhere torch and numpy are
    python -m fd_ray_sync.gpucheck                    # where the fd_ray_sync package imports
    python fd_ray_sync/gpucheck.py --device cpu       # CPU smoke run over shared memory

The module imports torch, numpy and the standard library only: no Ray, paddle, pydantic or other
fd_ray_sync module. ``-m`` first imports ``fd_ray_sync/__init__``, which needs Ray and pydantic,
so on a machine without them run the file by its path.

Processes (torch.multiprocessing, spawn), all on one GPU (cuda:0)::

    parent    sends one command at a time (floor, setup, then each method), collects results,
    |         kills the tree on a timeout or a death and starts a fresh one for what is left
    +- trainer  the model (~--gib GiB of bfloat16 in 900 tensors), the bucket ring, the host ring
    +- rank0    its TP slices of every tensor, allocated once and written in place
    +- rank1

Model: 90 layers of 4 matrices split by rows (rank r: rows [r*R/2, (r+1)*R/2), contiguous),
4 split by columns (rank r: the strided view [:, r*C/2:(r+1)*C/2]) and 2 replicated vectors.

Setup, once: the trainer shares every handle once, as one pickled message per rank (torch's
CUDA IPC reductions; shared-memory file descriptors on CPU): its parameter tensors with a table
of (data_ptr, shape), the ring buckets, the host buckets and the interprocess "ready" events.
Each rank sends the handles of its "released" events. Everyone opens the other side's handles
once and keeps them for every update. Nobody opens its own handles.

One update, any method, through a shared int64 control block (``Ctl``)::

    trainer  change every tensor in place (bits + 1, masked to finite bf16); write each rank's
             expected checksum; synchronize
    rank     IDLE[r] = u                      (registered: after checking the pointer table)
    trainer  T0 = now; GO = u
             ... the method moves the bytes ...
    rank     synchronize; T1[r] = now; DONE[r] = u        time of the update = max(T1) - T0
    rank     compare its params bit for bit with its slices of the trainer's tensors (opened
             via IPC) and its checksum with the trainer's; VERIFIED[r] = u
    trainer  waits VERIFIED before changing its tensors again

Methods:

- ``floor``: one device-to-device copy of a flat buffer of all the model's bytes (plus, as
  information, the same bytes as 1800 slice copies in one process, and one big pinned
  host-to-device copy: the reference of ``host``).
- ``ring``: bucket g of the update uses slot s = g % R. The trainer waits RELEASED[r][s] >= g-R
  from both ranks, makes its stream wait their RELEASED_EV[r][s], packs whole tensors into the
  slot (device-to-device), records READY_EV[s] and sets READY[s] = g. A rank waits READY[s] = g,
  makes its stream wait READY_EV[s], copies its slices with ``param.copy_(view[rows])`` or
  ``param.copy_(view[:, cols])`` (a strided 2-D copy, never ``.contiguous()`` first), records
  RELEASED_EV[r][s] and sets RELEASED[r][s] = g. The host flags only say which record of an
  event to wait for; the GPU orders the bytes.
- ``ring_hostsync``: the same ring with a stream synchronize instead of the events.
- ``registered``: no pack. Ranks copy their slices straight from the trainer's tensors, which
  the trainer changed in place (and synchronized before GO). Each update the trainer sends the
  (data_ptr, shape) table and a rank refuses, copying nothing, if it differs from what it
  registered. Self-test after the timed updates: the trainer reallocates one tensor, both ranks
  must refuse that update, the trainer re-registers the tensor, one more update must verify.
- ``host``: pinned host buckets (for a trainer on another GPU): the trainer copies each rank's
  slice contiguous into host slot s (device to host), synchronizes, sets READY[s]; ranks copy
  host to device straight into their params, synchronize, set RELEASED[r][s]. Host buckets are
  shared memory page-locked in each process with cudaHostRegister.

Memory: each process reports torch.cuda.max_memory_allocated() over the transfer of an update
minus what it held before (peaks reset after setup). Memory opened through CUDA IPC is not
counted by the opener's allocator, so a rank's figure counts only what it allocated itself.

CPU mode (``--device cpu``): the same processes, control block, plans, slicing, ordering, checks
and reallocation refusal with CPU tensors in shared memory (``share_memory_()``) instead of
CUDA IPC and no events (CPU copies are synchronous). Its timings are only printed.

The control block relies on aligned 8-byte stores being atomic and ordered (x86-64); on GPU the
bytes themselves are ordered by events or stream synchronization, not by the host flags.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import os
import pickle
import queue
import shutil
import signal
import statistics
import sys
import threading
import time
import traceback
from dataclasses import dataclass

if __name__ == "__main__" and not __package__:
    # Run as a file: its folder is sys.path[0], where the package's own modules (config.py,
    # status.py, ...) could shadow top-level names. Spawned children inherit this sys.path.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

from multiprocessing.reduction import ForkingPickler  # noqa: E402

import torch  # noqa: E402
import torch.multiprocessing as tmp  # noqa: E402  (registers torch's reductions on ForkingPickler)

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


class Aborted(RuntimeError):
    """Another process failed; this one stops waiting for it."""


class StaleRegistrationError(RuntimeError):
    """The trainer reallocated a registered tensor: reading the old handle would read freed
    memory, so the rank refuses the update until the tensor is registered again."""


# ---------------------------------------------------------------- model and plans (pure)


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


# ---------------------------------------------------------------- control block


class Ctl:
    """int64 slots in shared memory. Within one method they only grow; the parent zeroes
    them between commands, when every child is idle. Values are ``u + 1`` / ``g + 1`` so that
    0 means "nothing yet".

        0 ABORT  1 GO  2 T0 | 8 + 8*r + k: per rank IDLE DONE T1 VERIFIED REFUSED EXPECT
        64 + s: READY[s]    | 128 + 64*r + s: RELEASED[r][s]      (s < MAX_SLOTS)
    """

    SLOTS = 512
    MAX_SLOTS = 64
    ABORT, GO, T0 = 0, 1, 2
    _RANK_FIELDS = ("IDLE", "DONE", "T1", "VERIFIED", "REFUSED", "EXPECT")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.a = tensor.numpy()

    def get(self, i: int) -> int:
        return int(self.a[i])

    def set(self, i: int, v: int) -> None:
        self.a[i] = v

    def rank(self, field: str, r: int) -> int:
        return 8 + 8 * r + self._RANK_FIELDS.index(field)

    @staticmethod
    def ready(s: int) -> int:
        return 64 + s

    @staticmethod
    def released(r: int, s: int) -> int:
        return 128 + 64 * r + s


# ---------------------------------------------------------------- child processes


def _host_register(t: torch.Tensor) -> str | None:
    """Page-lock a shared CPU tensor in this process; None on success, else why not."""
    ptr, n = t.data_ptr(), t.numel() * t.element_size()
    why = []
    try:
        rc = torch.cuda.cudart().cudaHostRegister(ptr, n, 0)
        if int(rc) == 0:
            return None
        why.append(f"torch cudart cudaHostRegister -> {rc}")
    except Exception as e:  # noqa: BLE001 - try the next binding
        why.append(f"torch cudart: {e!r}")
    try:
        from cuda.bindings import runtime as rt

        res = rt.cudaHostRegister(ptr, n, 0)
        rc = res[0] if isinstance(res, tuple) else res
        if int(rc) == 0:
            return None
        why.append(f"cuda.bindings cudaHostRegister -> {rc}")
    except Exception as e:  # noqa: BLE001
        why.append(f"cuda.bindings: {e!r}")
    return "; ".join(why)


def _host_unregister(t: torch.Tensor) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
    except Exception:  # noqa: BLE001, S110 - best effort at exit
        pass


class _Proc:
    """What the trainer and the ranks share: plans, waits, messages, clocks, memory."""

    def __init__(self, name: str, cfg: dict, ctl: Ctl, inbox, outboxes):
        self.name, self.cfg, self.ctl = name, cfg, ctl
        self.inbox, self.outboxes = inbox, outboxes
        self.cuda = cfg["device"] == "cuda"
        self.deadline = math.inf
        if self.cuda:
            torch.cuda.set_device(0)
            self.dev = torch.device("cuda", 0)
        else:
            torch.set_num_threads(1)
            self.dev = torch.device("cpu")
        self.specs = model_specs(cfg["gib"])
        self.ring_slots = cfg["ring_buckets"]
        self.host_slots = cfg["host_buckets"]
        self.bucket_bytes = align(int(cfg["bucket_mib"] * MiB))
        self.ring_plan = plan_buckets([s.nbytes for s in self.specs], self.bucket_bytes)
        self.parts = host_parts(self.specs)
        self.host_plan: list[list[tuple[int, int]]] = []
        self.host_disabled: str | None = None
        self.events_error: str | None = None
        # (kind, bucket, slot) -> [(destination, source)]: views built once, so that an
        # update only launches copies
        self._pairs: dict[tuple[str, int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def log(self, msg: str, *args) -> None:
        text = msg % args if args else msg
        # One write per line, so that lines of different processes do not interleave.
        line = f"[{time.monotonic() - self.cfg['t_start']:8.2f}s {self.name:>7}] {text}\n"
        print(line, end="", flush=True)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def wait_until(self, slots: list[int], value: int, what: str) -> None:
        """Until every control slot in ``slots`` reached ``value``: spin, then yield, then nap."""
        a = self.ctl.a
        spins = 0
        while any(a[i] < value for i in slots):
            spins += 1
            if spins < 256:
                continue
            if self.ctl.get(Ctl.ABORT):
                raise Aborted(f"{self.name} stopped waiting for {what}: another process failed")
            if time.monotonic() > self.deadline:
                raise TimeoutError(f"{self.name} timed out waiting for {what}")
            time.sleep(0 if spins < 4096 else 0.0002)

    def _ranks(self, field: str) -> list[int]:
        return [self.ctl.rank(field, r) for r in range(TP)]

    def send(self, box, obj) -> None:
        # Pickled here, in this thread (not in the queue's feeder thread), so errors surface here.
        box.put(bytes(ForkingPickler.dumps(obj)))

    def recv(self, what: str):
        while True:
            try:
                data = self.inbox.get(timeout=0.1)
            except queue.Empty:
                if self.ctl.get(Ctl.ABORT):
                    raise Aborted(f"{self.name} stopped waiting for {what}") from None
                if time.monotonic() > self.deadline:
                    raise TimeoutError(f"{self.name} timed out waiting for {what}") from None
                continue
            return pickle.loads(data)

    def mem_base(self) -> int:
        if not self.cuda:
            return 0
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def mem_peak_mib(self, base: int) -> float | None:
        if not self.cuda:
            return None
        return (torch.cuda.max_memory_allocated() - base) / MiB

    def set_host_plan(self, host_bucket_bytes: int) -> None:
        sizes = [2 * math.prod(part_shape(self.specs[i], p)) for i, p in self.parts]
        self.host_plan = plan_buckets(sizes, host_bucket_bytes)

    def handle(self, cmd: str) -> dict:
        if cmd == "floor":
            out = self.floor()
            if self.cuda:  # give the floor's buffers back before the ranks allocate
                torch.cuda.empty_cache()
                getattr(torch._C, "_host_emptyCache", lambda: None)()
            return out
        if cmd == "setup":
            return self.setup()
        if cmd in CUDA_METHODS:
            if cmd == "host" and self.host_disabled:
                raise RuntimeError(self.host_disabled)
            if cmd == "ring" and self.cuda and self.events_error:
                raise RuntimeError(
                    f"ring needs interprocess CUDA events, which failed: {self.events_error} "
                    "(ring_hostsync runs the same ring without them)"
                )
            return self.run_method(cmd)
        raise ValueError(f"{self.name}: unknown command {cmd!r}")

    def floor(self) -> dict:
        raise ValueError(f"{self.name} has no floor step")

    def maybe_fault(self, method: str, u: int) -> None:
        """--inject-fault WHO:METHOD:KIND, for the tests of the parent's fault handling."""
        kind = self.cfg["faults"].get(f"{self.name}:{method}")
        if not kind or u != min(1, self.cfg["updates"] - 1):
            return
        self.log("injected fault: %s in %s update %d", kind, method, u)
        if kind == "exit":
            os._exit(7)
        if kind == "hang":
            time.sleep(1e6)
        raise RuntimeError(f"injected fault in {self.name}, {method} update {u}")

    def close(self) -> None:
        pass


class Trainer(_Proc):
    def __init__(self, *a):
        super().__init__(*a)
        self.model: list[torch.Tensor] = []
        self.retired: list[torch.Tensor] = []  # kept alive: ranks may still hold their handles
        self.moved: list[int] = []
        self.pinned: list[torch.Tensor] = []

    def _need(self, nbytes: int, what: str) -> None:
        if not self.cuda:
            return
        free, total = torch.cuda.mem_get_info()
        if free < nbytes:
            raise MemoryError(
                f"{what} needs {nbytes / GiB:.1f} GiB of device memory; {free / GiB:.1f} GiB "
                f"free of {total / GiB:.1f} GiB: lower --gib"
            )

    def _timed(self, fn, *args, **kwargs) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        self.sync()
        return time.perf_counter() - t0

    def floor(self) -> dict:
        offsets, flat = flat_layout([s.nbytes for s in self.specs])
        # The ranks have not allocated yet: check what the whole tree will need, here.
        setup = flat + TP * sum(2 * math.prod(s.rank_shape()) for s in self.specs)
        self._need(setup + self.ring_slots * self.bucket_bytes + GiB, "the trainer and ranks")
        self._need(2 * flat + GiB, "the floor's two flat copies of the model")
        src = torch.empty(flat, dtype=torch.uint8, device=self.dev)
        dst = torch.empty_like(src)
        out = self._floor_copies(src, dst, offsets)
        if self.cuda:
            out["h2d_pinned"], out["d2h_pinned"] = self._pinned_copies(src, dst)
            props = torch.cuda.get_device_properties(0)
            out["device"] = {
                "name": props.name,
                "total_gib": props.total_memory / GiB,
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
            }
        return out

    def _floor_copies(self, src: torch.Tensor, dst: torch.Tensor, offsets: list[int]) -> dict:
        updates = self.cfg["updates"]
        flat = src.numel()
        out: dict = {"bytes": flat}
        times, ok, peaks = [], True, []
        for u in range(updates):
            src.random_(0, 256)
            base = self.mem_base()
            times.append(self._timed(lambda: dst.copy_(src)))
            peaks.append(self.mem_peak_mib(base))
            ok = ok and equal_bits(dst.view(torch.bfloat16), src.view(torch.bfloat16))
            self.log("floor %d: one copy of %.2f GiB in %.4f s", u, flat / GiB, times[-1])
        out["floor"] = {"times_s": times, "ok": ok, "trainer_extra_mib": _max(peaks)}

        def sliced():
            for i, s in enumerate(self.specs):
                full = bucket_view(src, offsets[i], s.shape)
                for r in range(TP):
                    o = offsets[i] + (r * s.nbytes // TP if s.split != "rep" else 0)
                    bucket_view(dst, o, s.rank_shape()).copy_(s.rank_slice(full, r))

        times, ok = [], True
        for u in range(updates):
            src.random_(0, 256)
            times.append(self._timed(sliced))
            self.log(
                "floor_sliced %d: %d slice copies in one process in %.4f s",
                u,
                2 * len(self.specs),
                times[-1],
            )
        for i, s in enumerate(self.specs):
            full = bucket_view(src, offsets[i], s.shape)
            o = offsets[i] + (s.nbytes // TP if s.split != "rep" else 0)
            ok = ok and equal_bits(bucket_view(dst, o, s.rank_shape()), s.rank_slice(full, TP - 1))
        out["floor_sliced"] = {"times_s": times, "ok": ok}
        return out

    def _pinned_copies(self, src: torch.Tensor, dst: torch.Tensor) -> tuple[dict, dict]:
        """One big pinned host<->device copy each way (up to 4 GiB): host-staged's reference."""
        n = min(src.numel(), 4 * GiB)
        host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        host.fill_(0x5A)
        dev = dst[:n]
        h2d, d2h = [], []
        for u in range(self.cfg["updates"]):
            h2d.append(self._timed(lambda: dev.copy_(host, non_blocking=True)))
            d2h.append(self._timed(lambda: host.copy_(src[:n], non_blocking=True)))
            self.log(
                "pinned %d: %.2f GiB host->device %.4f s, device->host %.4f s",
                *(u, n / GiB, h2d[-1], d2h[-1]),
            )
        ok = torch.equal(host[: 1 << 20], src[: 1 << 20].cpu())
        return {"bytes": n, "times_s": h2d, "ok": ok}, {"bytes": n, "times_s": d2h}

    def table(self) -> list[tuple[int, tuple[int, ...]]]:
        return [(t.data_ptr(), tuple(t.shape)) for t in self.model]

    def _shared(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.cuda else t.share_memory_()

    def setup(self) -> dict:
        t_setup = time.perf_counter()
        specs = self.specs
        model_bytes = sum(s.nbytes for s in specs)
        rank_bytes = sum(2 * math.prod(s.rank_shape()) for s in specs)
        self._need(model_bytes + self.ring_slots * self.bucket_bytes + GiB, "the trainer's setup")
        torch.manual_seed(self.cfg["seed"])
        if self.cuda:  # one allocation per tensor, as a trainer's parameters are
            self.model = [
                torch.empty(s.shape, dtype=torch.bfloat16, device=self.dev) for s in specs
            ]
        else:  # one shared-memory arena per layer (fewer file descriptors), tensors are views
            self.model = []
            for layer in range(len(specs) // PER_LAYER):
                group = specs[layer * PER_LAYER : (layer + 1) * PER_LAYER]
                offsets, size = flat_layout([s.nbytes for s in group])
                arena = torch.empty(size, dtype=torch.uint8).share_memory_()
                self.model.extend(bucket_view(arena, o, s.shape) for o, s in zip(offsets, group))
        for t in self.model:
            t.view(torch.int16).random_(0, VALUE_MASK + 1)
        self.ring = [
            self._shared(torch.empty(self.bucket_bytes, dtype=torch.uint8, device=self.dev))
            for _ in range(self.ring_slots)
        ]
        host_bucket_bytes = self._host_bucket_bytes(model_bytes)
        self.host = []
        if host_bucket_bytes:
            self.set_host_plan(host_bucket_bytes)
            self.host = [
                torch.empty(host_bucket_bytes, dtype=torch.uint8).share_memory_()
                for _ in range(self.host_slots)
            ]
        pinned = self._pin(self.host)
        handles = []
        if self.cuda:
            try:
                self.ready_ev = [
                    torch.cuda.Event(interprocess=True) for _ in range(self.ring_slots)
                ]
                handles = [e.ipc_handle() for e in self.ready_ev]
            except Exception as e:  # noqa: BLE001 - only the ring needs them
                self.events_error = f"trainer: {e!r}"
                self.log("interprocess events failed, ring will be skipped: %r", e)
        self.sync()
        blob = {
            "model": self.model,
            "table": self.table(),
            "ring": self.ring,
            "host": self.host,
            "host_bucket_bytes": host_bucket_bytes,
            "host_disabled": self.host_disabled,
            "ready_events": handles,
            "events_error": self.events_error,
        }
        t0 = time.perf_counter()
        for box in self.outboxes:
            self.send(box, blob)
        pickle_s = time.perf_counter() - t0
        got: dict = {}
        while len(got) < TP:
            m = self.recv("the ranks' setup messages")
            got[m["rank"]] = m
        errors = [got[r]["events_error"] for r in range(TP) if got[r]["events_error"]]
        self.events_error = "; ".join(filter(None, [self.events_error, *errors])) or None
        if self.cuda and not self.events_error:
            try:
                self.rel_ev = [
                    [
                        torch.cuda.Event.from_ipc_handle(self.dev, h)
                        for h in got[r]["release_events"]
                    ]
                    for r in range(TP)
                ]
            except Exception as e:  # noqa: BLE001
                self.events_error = f"trainer opening the ranks' events: {e!r}"
                self.log("%s", self.events_error)
        info = {
            "hidden": hidden_size(self.cfg["gib"]),
            "tensors": len(specs),
            "model_bytes": model_bytes,
            "rank_bytes": rank_bytes,
            "ring": f"{self.ring_slots} x {self.bucket_bytes / MiB:.1f} MiB, "
            f"{len(self.ring_plan)} buckets an update",
            "host_ring": (
                f"{self.host_slots} x {host_bucket_bytes / MiB:.1f} MiB, "
                f"{len(self.host_plan)} buckets an update, pinned: {pinned}"
                if host_bucket_bytes
                else self.host_disabled
            ),
            "handles_sent_s": pickle_s,
            "setup_s": time.perf_counter() - t_setup,
        }
        if self.cuda and self.host:
            info["host_bucket_h2d_gbps"] = self._host_bucket_h2d()
        if self.cuda:
            torch.cuda.empty_cache()
            info["trainer_setup_allocated_mib"] = torch.cuda.memory_allocated() / MiB
            torch.cuda.reset_peak_memory_stats()
        self.log("setup: %s", info)
        return info

    def _host_bucket_bytes(self, model_bytes: int) -> int:
        largest = max(2 * math.prod(part_shape(self.specs[i], p)) for i, p in self.parts)
        want = self.bucket_bytes
        try:
            free = shutil.disk_usage("/dev/shm").free
        except OSError:
            return want
        in_shm = 0 if self.cuda else model_bytes + self.ring_slots * self.bucket_bytes
        budget = int(free * 0.6) - in_shm
        size = min(want, budget // self.host_slots // ALIGN * ALIGN)
        if size < largest:
            self.host_disabled = (
                f"host-staged skipped: /dev/shm has {free / MiB:.0f} MiB free, too little for "
                f"{self.host_slots} host buckets of at least {largest / MiB:.1f} MiB"
            )
            self.log(self.host_disabled)
            return 0
        if size < want:
            self.log(
                "host buckets shrunk to %.1f MiB: /dev/shm has %.0f MiB free",
                size / MiB,
                free / MiB,
            )
        return size

    def _pin(self, bufs: list[torch.Tensor]) -> str:
        if not self.cuda or not bufs:
            return "n/a"
        for b in bufs:
            why = _host_register(b)
            if why:
                self.log("host bucket NOT pinned (pageable copies, slower): %s", why)
                return f"no ({why})"
            self.pinned.append(b)
        return "yes"

    def _host_bucket_h2d(self) -> float:
        """Host bucket 0 to the device: about pinned H2D speed if cudaHostRegister worked."""
        dev = torch.empty(self.host[0].numel(), dtype=torch.uint8, device=self.dev)
        best = min(self._timed(dev.copy_, self.host[0], non_blocking=True) for _ in range(3))
        return self.host[0].numel() / best / 1e9

    # -- one method

    def change_model(self) -> None:
        for t in self.model:
            x = t.view(torch.int16)
            x.add_(1)
            x.bitwise_and_(VALUE_MASK)

    def run_method(self, method: str) -> dict:
        updates = self.cfg["updates"]
        total = updates + (2 if method == "registered" else 0)
        events = self.cuda and method == "ring"
        records = []
        for u in range(total):
            phase = "timed" if u < updates else ("refusal" if u == updates else "confirm")
            if phase == "refusal":
                self._reallocate_one()
            if phase == "confirm":
                self._reregister()
            self.change_model()
            for r in range(TP):
                expect = combined_checksum(
                    [s.rank_slice(t, r) for s, t in zip(self.specs, self.model)]
                )
                self.ctl.set(self.ctl.rank("EXPECT", r), expect)
            self.sync()
            if method == "registered":
                for box in self.outboxes:
                    self.send(box, ("table", u, self.table()))
            self.wait_until(self._ranks("IDLE"), u + 1, f"ranks idle before update {u}")
            base = self.mem_base()
            t0 = time.monotonic_ns()
            self.ctl.set(Ctl.T0, t0)
            self.ctl.set(Ctl.GO, u + 1)
            self.maybe_fault(method, u)
            if method in ("ring", "ring_hostsync"):
                self._produce_ring(u, events)
            elif method == "host":
                self._produce_host(u)
            self.wait_until(self._ranks("DONE"), u + 1, f"ranks done with update {u}")
            seconds = (max(self.ctl.get(self.ctl.rank("T1", r)) for r in range(TP)) - t0) / 1e9
            peak = self.mem_peak_mib(base)
            self.wait_until(self._ranks("VERIFIED"), u + 1, f"ranks' checks of update {u}")
            refused = [self.ctl.get(self.ctl.rank("REFUSED", r)) == u + 1 for r in range(TP)]
            records.append(
                {
                    "u": u,
                    "phase": phase,
                    "time_s": seconds,
                    "trainer_extra_mib": peak,
                    "refused": refused,
                }
            )
            self.log(
                "%s update %d (%s): %.4f s%s",
                method,
                u,
                phase,
                seconds,
                f", refused by {refused}" if any(refused) else "",
            )
        return {"updates": records}

    def _produce_ring(self, u: int, events: bool) -> None:
        nb, slots = len(self.ring_plan), self.ring_slots
        for j in range(nb):
            g = u * nb + j
            s = g % slots
            if g >= slots:
                released = [Ctl.released(r, s) for r in range(TP)]
                self.wait_until(
                    released, g - slots + 1, f"ranks to release slot {s} (bucket {g - slots})"
                )
                if events:
                    for r in range(TP):
                        torch.cuda.current_stream().wait_event(self.rel_ev[r][s])
            for dst, src in self._copies("ring", j, s):
                dst.copy_(src, non_blocking=True)
            if events:
                self.ready_ev[s].record()
            else:
                self.sync()
            self.ctl.set(Ctl.ready(s), g + 1)

    def _produce_host(self, u: int) -> None:
        nb, slots = len(self.host_plan), self.host_slots
        for j in range(nb):
            g = u * nb + j
            s = g % slots
            if g >= slots:
                released = [Ctl.released(r, s) for r in range(TP)]
                self.wait_until(
                    released, g - slots + 1, f"ranks to release host slot {s} (bucket {g - slots})"
                )
            for dst, src in self._copies("host", j, s):
                dst.copy_(src, non_blocking=True)  # a strided source is made contiguous first
            self.sync()  # the device-to-host copies landed before a rank reads the bucket
            self.ctl.set(Ctl.ready(s), g + 1)

    def _copies(self, kind: str, j: int, s: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(bucket view, source) for bucket j of the plan in slot s: whole tensors for the
        ring, each rank's slice (or a replicated tensor once) for the host ring."""
        key = (kind, j, s)
        if key not in self._pairs:
            pairs = []
            if kind == "ring":
                for i, off in self.ring_plan[j]:
                    pairs.append(
                        (bucket_view(self.ring[s], off, self.specs[i].shape), self.model[i])
                    )
            else:
                for k, off in self.host_plan[j]:
                    i, part = self.parts[k]
                    spec, t = self.specs[i], self.model[i]
                    src = t if part < 0 else spec.rank_slice(t, part)
                    pairs.append((bucket_view(self.host[s], off, part_shape(spec, part)), src))
            self._pairs[key] = pairs
        return self._pairs[key]

    def _reallocate_one(self) -> None:
        i = next(
            k for k, s in enumerate(self.specs) if s.split == "col" and k >= len(self.specs) // 2
        )
        old = self.model[i]
        self.model[i] = self._shared(old.clone())
        self.retired.append(old)
        self.moved = [i]
        self._pairs.clear()
        self.log("self-test: reallocated %s (#%d) without re-registering it", self.specs[i].name, i)

    def _reregister(self) -> None:
        msg = (
            "reregister",
            {i: self.model[i] for i in self.moved},
            {i: self.table()[i] for i in self.moved},
        )
        for box in self.outboxes:
            self.send(box, msg)
        self.log("self-test: re-registered tensor(s) %s", self.moved)

    def close(self) -> None:
        for b in self.pinned:
            _host_unregister(b)


class Rank(_Proc):
    def __init__(self, *a, rank: int):
        super().__init__(*a)
        self.rank = rank
        self.pinned: list[torch.Tensor] = []

    def setup(self) -> dict:
        t_setup = time.perf_counter()
        self.params = [
            torch.zeros(s.rank_shape(), dtype=torch.bfloat16, device=self.dev) for s in self.specs
        ]
        handles = []
        if self.cuda:
            try:
                self.rel_ev = [torch.cuda.Event(interprocess=True) for _ in range(self.ring_slots)]
                handles = [e.ipc_handle() for e in self.rel_ev]
            except Exception as e:  # noqa: BLE001 - only the ring needs them
                self.events_error = f"rank {self.rank}: {e!r}"
        msg = {"rank": self.rank, "release_events": handles, "events_error": self.events_error}
        self.send(self.outboxes[0], msg)
        t0 = time.perf_counter()
        blob = self.recv("the trainer's setup message")  # opens every handle, once
        open_s = time.perf_counter() - t0
        self.tviews = blob["model"]
        self.registered = [(p, tuple(shape)) for p, shape in blob["table"]]
        self.ring, self.host = blob["ring"], blob["host"]
        self.host_disabled = blob["host_disabled"]
        if blob["host_bucket_bytes"]:
            self.set_host_plan(blob["host_bucket_bytes"])
        bad = [
            s.name
            for s, t in zip(self.specs, self.tviews)
            if tuple(t.shape) != s.shape or t.dtype != torch.bfloat16
        ]
        if len(self.tviews) != len(self.specs) or bad:
            raise RuntimeError(
                f"rank {self.rank}: the trainer's tensors do not match the plan: {bad[:5]}"
            )
        self.events_error = self.events_error or blob["events_error"]
        if self.cuda and not self.events_error:
            try:
                self.ready_ev = [
                    torch.cuda.Event.from_ipc_handle(self.dev, h) for h in blob["ready_events"]
                ]
            except Exception as e:  # noqa: BLE001
                self.events_error = f"rank {self.rank} opening the trainer's events: {e!r}"
                self.log("%s", self.events_error)
        if self.cuda:
            for b in self.host:
                why = _host_register(b)
                if why:
                    self.log("host bucket NOT pinned here: %s", why)
                    break
                self.pinned.append(b)
        self.sync()
        info = {
            "params_mib": sum(p.numel() * 2 for p in self.params) / MiB,
            "opened_handles_s": open_s,
            "setup_s": time.perf_counter() - t_setup,
        }
        if self.cuda:
            info["setup_allocated_mib"] = torch.cuda.memory_allocated() / MiB
            torch.cuda.reset_peak_memory_stats()
        self.log(
            "setup: opened %d tensors, %d ring and %d host buckets in %.3f s",
            len(self.tviews),
            len(self.ring),
            len(self.host),
            open_s,
        )
        return info

    def run_method(self, method: str) -> dict:
        updates = self.cfg["updates"]
        total = updates + (2 if method == "registered" else 0)
        events = self.cuda and method == "ring"
        r = self.rank
        records = []
        for u in range(total):
            phase = "timed" if u < updates else ("refusal" if u == updates else "confirm")
            refusal = None
            if method == "registered":
                try:
                    self._take_table(u)
                except StaleRegistrationError as e:
                    refusal = str(e)
                    self.ctl.set(self.ctl.rank("REFUSED", r), u + 1)
                    self.log("%s", refusal)
            self.ctl.set(self.ctl.rank("IDLE", r), u + 1)
            self.wait_until([Ctl.GO], u + 1, f"GO for update {u}")
            self.maybe_fault(method, u)
            base = self.mem_base()
            if refusal is None:
                if method in ("ring", "ring_hostsync"):
                    self._consume_ring(u, events)
                elif method == "host":
                    self._consume_host(u)
                else:  # registered: straight from the trainer's tensors, no bucket
                    for dst, src in self._copies("registered", 0, 0):
                        dst.copy_(src, non_blocking=True)
            self.sync()
            self.ctl.set(self.ctl.rank("T1", r), time.monotonic_ns())
            self.ctl.set(self.ctl.rank("DONE", r), u + 1)
            rec = {"u": u, "phase": phase, "extra_mib": self.mem_peak_mib(base), "refused": refusal}
            if refusal is None:
                rec.update(self._verify())
            self.ctl.set(self.ctl.rank("VERIFIED", r), u + 1)
            records.append(rec)
        return {"updates": records}

    def _take_table(self, u: int) -> None:
        while True:
            msg = self.recv(f"the trainer's table for update {u}")
            if msg[0] == "reregister":
                _, tensors, entries = msg
                for i, t in tensors.items():
                    self.tviews[i] = t
                    p, shape = entries[i]
                    self.registered[i] = (p, tuple(shape))
                self._pairs.clear()
                self.log("re-registered tensor(s) %s", sorted(tensors))
                continue
            kind, got_u, table = msg
            if kind != "table" or got_u != u:
                raise RuntimeError(
                    f"rank {self.rank}: expected the table of update {u}, got {kind!r} of {got_u}"
                )
            break
        moved = [
            (i, reg, (p, tuple(shape)))
            for i, (reg, (p, shape)) in enumerate(zip(self.registered, table))
            if (p, tuple(shape)) != reg
        ]
        if moved:
            what = "; ".join(
                f"{self.specs[i].name} (#{i}) registered at {reg[0]:#x} {reg[1]}, "
                f"now at {now[0]:#x} {now[1]}"
                for i, reg, now in moved[:3]
            )
            raise StaleRegistrationError(
                f"rank {self.rank} refuses update {u}: {len(moved)} trainer tensor(s) were "
                f"reallocated since they were registered ({what}); register them again"
            )

    def _take_slot(self, s: int, g: int, ring: str) -> None:
        """Wait until slot s holds bucket g. The trainer cannot refill the slot before this
        rank released it, so any other value is a protocol bug."""
        self.wait_until([Ctl.ready(s)], g + 1, f"{ring} slot {s} (bucket {g})")
        held = self.ctl.get(Ctl.ready(s)) - 1
        if held != g:
            raise RuntimeError(f"rank {self.rank}: {ring} slot {s} holds bucket {held}, not {g}")

    def _consume_ring(self, u: int, events: bool) -> None:
        nb, slots, r = len(self.ring_plan), self.ring_slots, self.rank
        for j in range(nb):
            g = u * nb + j
            s = g % slots
            self._take_slot(s, g, "ring")
            if events:
                torch.cuda.current_stream().wait_event(self.ready_ev[s])
            for dst, src in self._copies("ring", j, s):
                dst.copy_(src, non_blocking=True)  # strided 2-D for column splits
            if events:
                self.rel_ev[s].record()
            else:
                self.sync()
            self.ctl.set(Ctl.released(r, s), g + 1)

    def _consume_host(self, u: int) -> None:
        nb, slots, r = len(self.host_plan), self.host_slots, self.rank
        for j in range(nb):
            g = u * nb + j
            s = g % slots
            self._take_slot(s, g, "host")
            for dst, src in self._copies("host", j, s):
                dst.copy_(src, non_blocking=True)
            self.sync()  # the host bucket may be refilled once RELEASED is set
            self.ctl.set(Ctl.released(r, s), g + 1)

    def _copies(self, kind: str, j: int, s: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(param, source view) for bucket j in slot s, or for the trainer's own tensors."""
        key = (kind, j, s)
        if key not in self._pairs:
            r, specs = self.rank, self.specs
            if kind == "ring":
                pairs = [
                    (
                        self.params[i],
                        specs[i].rank_slice(bucket_view(self.ring[s], off, specs[i].shape), r),
                    )
                    for i, off in self.ring_plan[j]
                ]
            elif kind == "host":
                pairs = []
                for k, off in self.host_plan[j]:
                    i, part = self.parts[k]
                    if part in (r, -1):
                        pairs.append(
                            (self.params[i], bucket_view(self.host[s], off, self.params[i].shape))
                        )
            else:
                pairs = [
                    (p, sp.rank_slice(t, r)) for p, sp, t in zip(self.params, specs, self.tviews)
                ]
            self._pairs[key] = pairs
        return self._pairs[key]

    def _verify(self) -> dict:
        r = self.rank
        bad = [
            s.name
            for i, s in enumerate(self.specs)
            if not equal_bits(self.params[i], s.rank_slice(self.tviews[i], r))
        ]
        got = combined_checksum(self.params)
        expect = self.ctl.get(self.ctl.rank("EXPECT", r))
        return {
            "equal": not bad,
            "bad": bad[:5],
            "checksum_ok": got == expect,
            "ok": not bad and got == expect,
        }

    def close(self) -> None:
        for b in self.pinned:
            _host_unregister(b)


def _watch_parent() -> None:
    ppid = os.getppid()

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != ppid:
                os._exit(3)  # the parent is gone: nobody will ever send "exit"

    threading.Thread(target=watch, daemon=True, name="watch-parent").start()


def _raise_fd_limit() -> None:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, ValueError, OSError):
        pass


def child_main(name, cfg, ctl_tensor, cmd_q, res_q, inbox, outboxes) -> None:
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent asks for stacks on a hang
    faulthandler.dump_traceback_later(cfg["timeout_s"] + 60, exit=True)
    _watch_parent()
    _raise_fd_limit()
    ctl = Ctl(ctl_tensor)
    proc, init_error = None, None
    try:
        if name == "trainer":
            proc = Trainer(name, cfg, ctl, inbox, outboxes)
        else:
            proc = Rank(name, cfg, ctl, inbox, outboxes, rank=int(name[-1]))
        proc.log("started, pid %d", os.getpid())
    except BaseException:  # noqa: BLE001 - reported on the first command
        init_error = traceback.format_exc()
    while True:
        cmd, seq, deadline = cmd_q.get()
        if cmd == "exit":
            break
        if init_error:
            res_q.put(("error", name, seq, init_error))
            continue
        proc.deadline = deadline
        try:
            res_q.put(("ok", name, seq, proc.handle(cmd)))
        except Aborted as e:
            res_q.put(("error", name, seq, f"aborted: {e}"))
        except BaseException:  # noqa: BLE001 - the parent shows the traceback
            ctl.set(Ctl.ABORT, 1)
            res_q.put(("error", name, seq, traceback.format_exc()))
    if proc is not None:
        proc.close()


# ---------------------------------------------------------------- parent


class StepFailed(RuntimeError):
    def __init__(self, step: str, errors: dict, timed_out: bool = False):
        self.step, self.errors, self.timed_out = step, errors, timed_out
        super().__init__(f"{step} failed: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))

    def summary(self) -> str:
        """Each process's last line (a traceback's exception), for the table."""
        last = {k: (v.strip().splitlines() or ["?"])[-1] for k, v in self.errors.items()}
        return "; ".join(f"{k}: {v}" for k, v in last.items())


class Tree:
    """The trainer and the two ranks, and the parent's side of their queues."""

    def __init__(self, cfg: dict, ctx, log):
        self.log = log
        self.ctl = Ctl(torch.zeros(Ctl.SLOTS, dtype=torch.int64).share_memory_())
        self.res_q = ctx.Queue()
        self.cmd_q = {n: ctx.Queue() for n in NAMES}
        # Held for the tree's life: a queue the parent drops is unlinked before a spawned
        # child has unpickled it.
        self.inbox = inbox = {n: ctx.Queue() for n in NAMES}
        self.procs = {}
        for n in NAMES:
            outboxes = [inbox["rank0"], inbox["rank1"]] if n == "trainer" else [inbox["trainer"]]
            args = (n, cfg, self.ctl.tensor, self.cmd_q[n], self.res_q, inbox[n], outboxes)
            p = ctx.Process(target=child_main, name=f"gpucheck-{n}", args=args, daemon=True)
            p.start()
            self.procs[n] = p
        self.seq = 0

    def command(self, cmd: str, names: tuple[str, ...], deadline: float) -> dict:
        self.seq += 1
        seq = self.seq
        self.ctl.a[:] = 0  # every child is idle between commands
        for n in names:
            self.cmd_q[n].put((cmd, seq, deadline))
        out, errors = {}, {}
        grace = math.inf
        while len(out) + len(errors) < len(names):
            try:
                kind, name, got_seq, payload = self.res_q.get(timeout=0.25)
            except queue.Empty:
                now = time.monotonic()
                for n, p in self.procs.items():
                    if not p.is_alive() and n not in errors:
                        errors[n] = f"died with exit code {p.exitcode}"
                        self.ctl.set(Ctl.ABORT, 1)
                        grace = min(grace, now + 5)  # let the others report what they saw
                if now > grace:
                    for n in names:
                        if n not in out:
                            errors.setdefault(n, f"no answer to {cmd!r} after a failure")
                    break
                if now > deadline:
                    self.dump_stacks()
                    for n in names:
                        if n not in out:
                            errors.setdefault(n, f"no answer to {cmd!r} before the deadline")
                    raise StepFailed(cmd, errors, timed_out=True) from None
                continue
            if got_seq != seq:
                continue
            if kind == "ok":
                out[name] = payload
            else:
                errors[name] = payload
                self.ctl.set(Ctl.ABORT, 1)
                grace = min(grace, time.monotonic() + 10)
        if errors:
            raise StepFailed(cmd, errors)
        return out

    def dump_stacks(self) -> None:
        for n, p in self.procs.items():
            if p.is_alive():
                self.log("asking %s (pid %d) for its stack", n, p.pid)
                try:
                    os.kill(p.pid, signal.SIGUSR1)
                except OSError:
                    pass
        time.sleep(1.5)

    def kill(self) -> None:
        for p in self.procs.values():
            if p.is_alive():
                p.kill()
        for p in self.procs.values():
            p.join(10)

    def close(self) -> None:
        # Ranks first: the trainer must outlive every handle opened on its memory.
        for group in (("rank0", "rank1"), ("trainer",)):
            for n in group:
                self.cmd_q[n].put(("exit", 0, 0.0))
            for n in group:
                self.procs[n].join(30)
        self.kill()


def _max(values) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def _row(times: list[float], nbytes: int) -> dict:
    best = min(times)
    return {
        "best_s": best,
        "median_s": statistics.median(times),
        "times_s": times,
        "bytes": nbytes,
        "gbps": nbytes / best / 1e9 if best > 0 else None,
    }


def summarize_method(method: str, out: dict, report: dict) -> dict:
    trainer, ranks = out["trainer"]["updates"], [out[n]["updates"] for n in NAMES[1:]]
    timed = [rec for rec in trainer if rec["phase"] == "timed"]
    rank_bytes = report["setup"]["rank_bytes"]
    row = _row([rec["time_s"] for rec in timed], rank_bytes)
    checked = [rec for recs in ranks for rec in recs if rec["phase"] != "refusal"]
    row["bit_identical"] = all(rec.get("ok") for rec in checked)
    row["mismatches"] = sorted({b for rec in checked for b in rec.get("bad", [])})[:5]
    row["checksums_ok"] = all(rec.get("checksum_ok") for rec in checked)
    row["trainer_extra_mib"] = _max(rec["trainer_extra_mib"] for rec in timed)
    row["rank_extra_mib"] = [
        _max(rec["extra_mib"] for rec in recs if rec["phase"] == "timed") for recs in ranks
    ]
    floor = report["methods"].get("floor", {})
    if method == "host":
        h2d = report["methods"].get("h2d_pinned", {})
        if h2d.get("gbps"):
            ref_s, row["ratio_to"] = (
                rank_bytes / (h2d["gbps"] * 1e9),
                "pinned H2D of the same bytes",
            )
        elif floor.get("gbps"):
            ref_s, row["ratio_to"] = (
                rank_bytes / (floor["gbps"] * 1e9),
                "floor copy of the same bytes (cpu)",
            )
        else:
            ref_s = None
    else:
        ref_s, row["ratio_to"] = floor.get("best_s"), "floor"
    row["ratio"] = ref_s / row["best_s"] if ref_s and row["best_s"] > 0 else None
    row["target"] = TARGETS.get(method)
    cpu = report["config"]["device"] == "cpu"  # CPU timings are only printed
    row["target_met"] = None if row["ratio"] is None or cpu else row["ratio"] >= row["target"]
    extra = [m for m in row["rank_extra_mib"] if m is not None]
    row["rank_memory_met"] = None if not extra else max(extra) < RANK_EXTRA_TARGET_MIB
    if method == "registered":
        refusal = [rec for recs in ranks for rec in recs if rec["phase"] == "refusal"]
        confirm = [rec for recs in ranks for rec in recs if rec["phase"] == "confirm"]
        report["refusal"] = {
            "seen": len(refusal) == TP and all(rec["refused"] for rec in refusal),
            "messages": [rec["refused"] for rec in refusal],
            "confirmed_after_reregister": len(confirm) == TP
            and all(rec.get("ok") for rec in confirm),
        }
    return row


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _yes(v) -> str:
    return "-" if v is None else ("yes" if v else "NO")


def print_table(report: dict) -> None:
    na = "n/a" if report["config"]["device"] == "cpu" else "-"
    cols = ("method", "best s", "median s", "GB/s", "ratio", "target", "met", "bit-identical")
    cols += ("trainer+MiB", "rank0+MiB", "rank1+MiB")
    widths = (14, 9, 9, 8, 7, 7, 4, 13, 11, 10, 10)
    line = " ".join(f"{c:>{w}}" if k else f"{c:<{w}}" for k, (c, w) in enumerate(zip(cols, widths)))
    print("\n" + line + "\n" + "-" * len(line))
    for name, row in report["methods"].items():
        if "error" in row:
            print(f"{name:<14} FAILED: {row['error'][:200]}")
            continue
        ranks = row.get("rank_extra_mib") or [None, None]
        ratio = row.get("ratio")
        cells = (
            name,
            _fmt(row.get("best_s"), ".4f"),
            _fmt(row.get("median_s"), ".4f"),
            _fmt(row.get("gbps"), ".1f"),
            "-" if ratio is None else f"{ratio:.2f}x",
            _fmt(row.get("target"), ".2f"),
            _yes(row.get("target_met")),
            _yes(row.get("bit_identical")),
            _fmt(row.get("trainer_extra_mib"), ".1f", na),
            _fmt(ranks[0], ".1f", na),
            _fmt(ranks[1], ".1f", na),
        )
        print(
            " ".join(
                f"{c:>{w}}" if k else f"{c:<{w}}" for k, (c, w) in enumerate(zip(cells, widths))
            )
        )
    st = report.get("setup") or {}
    if st:
        opened = ", ".join(f"{r['opened_handles_s']:.3f}" for r in st.get("ranks", []))
        print(
            f"\nsetup: {st['tensors']} tensors, {st['model_bytes'] / GiB:.2f} GiB (hidden "
            f"{st['hidden']}); ring {st['ring']}; host ring {st['host_ring']}; ranks opened "
            f"every handle in {opened} s"
            + (
                f"; host bucket H2D {st['host_bucket_h2d_gbps']:.1f} GB/s"
                if "host_bucket_h2d_gbps" in st
                else ""
            )
        )
    ref = report.get("refusal")
    if ref:
        print(
            f"\nreallocation refusal seen: {_yes(ref['seen'])}; "
            f"update after re-registering verified: {_yes(ref['confirmed_after_reregister'])}"
        )
        for m in ref["messages"]:
            print(f"  {m}")
    print(
        "\ntargets: ring >= 0.45x floor, registered >= 0.8x floor, host >= 0.8x pinned H2D, "
        f"ranks' extra device memory < {RANK_EXTRA_TARGET_MIB:.0f} MiB"
    )
    for note in report["notes"]:
        print(f"note: {note}")
    sys.stdout.flush()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpucheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument(
        "--gib", type=float, default=None, help="model size (default 16 on cuda, 0.05 on cpu)"
    )
    p.add_argument("--updates", type=int, default=5, help="timed updates per method")
    p.add_argument(
        "--bucket-mib",
        type=float,
        default=None,
        help="ring and host bucket size (default 512 on cuda, 2 on cpu)",
    )
    p.add_argument("--ring-buckets", type=int, default=3, help="device buckets in the ring (>= 2)")
    p.add_argument(
        "--host-buckets", type=int, default=3, help="pinned host buckets in the ring (>= 2)"
    )
    p.add_argument(
        "--methods", default=None, help="comma-separated subset of: " + ",".join(CUDA_METHODS)
    )
    p.add_argument(
        "--timeout-s", type=float, default=480.0, help="global limit; children are killed after it"
    )
    p.add_argument(
        "--step-timeout-s", type=float, default=180.0, help="limit of setup and of each method"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--inject-fault",
        action="append",
        default=[],
        metavar="WHO:METHOD:KIND",
        help="tests only: make trainer|rank0|rank1 raise|exit|hang in a method's 2nd update",
    )
    p.add_argument(
        "--out", default=None, help="JSON report (default $OUT/gpucheck.json, else ./gpucheck.json)"
    )
    a = p.parse_args(argv)
    cuda = a.device == "cuda"
    a.gib = a.gib if a.gib is not None else (16.0 if cuda else 0.05)
    a.bucket_mib = a.bucket_mib if a.bucket_mib is not None else (512.0 if cuda else 2.0)
    known = CUDA_METHODS if cuda else CPU_METHODS
    a.methods = [m.strip() for m in a.methods.split(",")] if a.methods else list(known)
    unknown = [m for m in a.methods if m not in known]
    if unknown:
        p.error(f"unknown method(s) {unknown} for --device {a.device}; known: {', '.join(known)}")
    a.methods = ["floor"] + [m for m in a.methods if m != "floor"]  # every ratio needs it, first
    if not (2 <= a.ring_buckets <= Ctl.MAX_SLOTS and 2 <= a.host_buckets <= Ctl.MAX_SLOTS):
        p.error(f"--ring-buckets and --host-buckets must be between 2 and {Ctl.MAX_SLOTS}")
    if a.updates < 1 or a.gib <= 0 or a.bucket_mib <= 0:
        p.error("--updates, --gib and --bucket-mib must be positive")
    a.faults = {}
    for f in a.inject_fault:
        who, method, kind = (f.split(":") + ["", "", ""])[:3]
        if who not in NAMES or method not in known or kind not in ("raise", "exit", "hang"):
            p.error(f"--inject-fault {f!r}: want WHO:METHOD:KIND, e.g. rank1:ring:exit")
        a.faults[f"{who}:{method}"] = kind
    if a.out is None:
        a.out = os.path.join(os.environ.get("OUT") or ".", "gpucheck.json")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    deadline = t_start + args.timeout_s
    faulthandler.dump_traceback_later(args.timeout_s + 90, exit=True)  # the parent's own backstop
    os.environ.setdefault("PYTHONUNBUFFERED", "1")

    def log(msg, *a):
        text = msg % a if a else msg
        print(f"[{time.monotonic() - t_start:8.2f}s  parent] {text}\n", end="", flush=True)

    if args.device == "cuda" and not torch.cuda.is_available():
        log(
            "--device cuda but torch.cuda.is_available() is False (torch %s); use --device cpu",
            torch.__version__,
        )
        return 2
    specs = model_specs(args.gib)
    cfg = {
        "device": args.device,
        "gib": args.gib,
        "updates": args.updates,
        "bucket_mib": args.bucket_mib,
        "ring_buckets": args.ring_buckets,
        "host_buckets": args.host_buckets,
        "timeout_s": args.timeout_s,
        "seed": args.seed,
        "faults": args.faults,
        "t_start": t_start,
    }
    try:  # the plan is checked here, before any process starts
        plan_buckets([s.nbytes for s in specs], align(int(args.bucket_mib * MiB)))
    except ValueError as e:
        log("%s", e)
        return 2
    report: dict = {
        "config": {
            **cfg,
            "methods": args.methods,
            "tp": TP,
            "tensors": len(specs),
            "hidden": hidden_size(args.gib),
        },
        "env": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
            "dev_shm_free_mib": _shm_free_mib(),
            "cpus": os.cpu_count(),
        },
        "setup": {},
        "methods": {},
        "notes": [
            "rank and trainer +MiB: torch.cuda.max_memory_allocated() over the transfer minus what "
            "the process held before (peaks reset after setup); memory opened through CUDA IPC is "
            "not counted by the opener's allocator",
            "ratio: floor seconds / method seconds (host: pinned H2D seconds for the same bytes / "
            "method seconds), best of the timed updates",
        ],
        "errors": {},
    }
    if args.device == "cpu":
        report["notes"].append(
            "cpu run: shared memory instead of CUDA IPC; timings are only printed, "
            "the targets are for the GPU"
        )
    log(
        "model: %d tensors, %.3f GiB, hidden %d; methods %s; %s",
        len(specs),
        sum(s.nbytes for s in specs) / GiB,
        hidden_size(args.gib),
        ",".join(args.methods),
        report["env"],
    )
    ctx = tmp.get_context("spawn")
    remaining = list(args.methods)
    tree: Tree | None = None
    starts, timed_out = 0, False

    def step_deadline() -> float:
        return min(deadline, time.monotonic() + args.step_timeout_s)

    try:
        while remaining:
            if time.monotonic() > deadline:
                timed_out = True
                break
            if tree is None:
                if starts >= 3:
                    break
                starts += 1
                log("starting trainer and ranks (spawn), try %d", starts)
                tree = Tree(cfg, ctx, log)
                step = "floor" if remaining[0] == "floor" else "setup"
                try:
                    if step == "floor":
                        remaining.pop(0)
                        out = tree.command("floor", ("trainer",), step_deadline())["trainer"]
                        _guarded(log, report, "floor", _record_floor, out, report)
                    step = "setup"
                    setup = tree.command("setup", NAMES, step_deadline())
                    report["setup"] = {**setup["trainer"], "ranks": [setup[n] for n in NAMES[1:]]}
                except StepFailed as e:
                    log("%s", e)
                    report["errors"][f"{step} (try {starts})"] = e.errors
                    if step == "floor":
                        report["methods"]["floor"] = {"error": e.summary()}
                    tree.kill()
                    tree = None
                    timed_out = e.timed_out and time.monotonic() > deadline
                    continue
            method = remaining.pop(0)
            log("method %s", method)
            try:
                out = tree.command(method, NAMES, step_deadline())
                row = _guarded(log, report, method, summarize_method, method, out, report)
                if row is not None:
                    report["methods"][method] = row
                    log("%s: %s", method, {k: v for k, v in row.items() if k != "times_s"})
            except StepFailed as e:
                log("%s", e)
                report["methods"][method] = {"error": e.summary()}
                report["errors"][method] = e.errors
                tree.kill()
                tree = None
                timed_out = e.timed_out and time.monotonic() > deadline
    finally:
        if tree is not None:
            tree.close()
        for m in remaining:
            why = (
                "global timeout"
                if timed_out or time.monotonic() > deadline
                else "the trainer and ranks could not be set up"
            )
            report["methods"][m] = {"error": f"not run: {why}"}
        print_table(report)
        ok = _all_ok(report, args.methods)
        report["complete"] = ok
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2, default=str)
            log("wrote %s", args.out)
        except OSError as e:
            log("could not write %s: %s", args.out, e)
    faulthandler.cancel_dump_traceback_later()
    if timed_out:
        return 3
    return 0 if ok else 1


def _guarded(log, report: dict, name: str, fn, *args):
    """A bug in summing up one method's results is that method's error, not the run's end."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001
        tb = traceback.format_exc()
        log("summing up %s failed:\n%s", name, tb)
        report["methods"][name] = {"error": "summary failed: " + tb.strip().splitlines()[-1]}
        report["errors"][f"{name} summary"] = tb
        return None


def _record_floor(out: dict, report: dict) -> None:
    m = report["methods"]
    m["floor"] = {
        **_row(out["floor"]["times_s"], out["bytes"]),
        "bit_identical": out["floor"]["ok"],
        "trainer_extra_mib": out["floor"]["trainer_extra_mib"],
        "ratio": 1.0,
    }
    sliced = _row(out["floor_sliced"]["times_s"], out["bytes"])
    m["floor_sliced"] = {
        **sliced,
        "bit_identical": out["floor_sliced"]["ok"],
        "ratio_to": "floor",
        "ratio": m["floor"]["best_s"] / sliced["best_s"] if sliced["best_s"] else None,
    }
    if "h2d_pinned" in out:
        m["h2d_pinned"] = {
            **_row(out["h2d_pinned"]["times_s"], out["h2d_pinned"]["bytes"]),
            "bit_identical": out["h2d_pinned"]["ok"],
        }
        m["d2h_pinned"] = _row(out["d2h_pinned"]["times_s"], out["d2h_pinned"]["bytes"])
        report["env"]["device"] = out["device"]


def _all_ok(report: dict, methods: list[str]) -> bool:
    rows = [report["methods"].get(m, {"error": "missing"}) for m in methods]
    if any("error" in r or not r.get("bit_identical") for r in rows):
        return False
    if "registered" in methods:
        ref = report.get("refusal") or {}
        return bool(ref.get("seen") and ref.get("confirmed_after_reregister"))
    return True


def _shm_free_mib() -> float | None:
    try:
        return shutil.disk_usage("/dev/shm").free / MiB
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
