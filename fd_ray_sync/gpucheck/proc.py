"""What the trainer and the ranks share: the control block, host pinning and the process base."""

from __future__ import annotations

import math
import os
import pickle
import queue
import time
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing  # noqa: F401  (registers torch's reductions on ForkingPickler)

from .plan import CUDA_METHODS, TP, MiB, align, host_parts, model_specs, part_shape, plan_buckets


class Aborted(RuntimeError):
    """Another process failed; this one stops waiting for it."""


class StaleRegistrationError(RuntimeError):
    """The trainer reallocated a registered tensor: reading the old handle would read freed
    memory, so the rank refuses the update until the tensor is registered again."""


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


def host_register(t: torch.Tensor) -> str | None:
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


def host_unregister(t: torch.Tensor) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
    except Exception:  # noqa: BLE001, S110 - best effort at exit
        pass


class ProcBase:
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
        # update only launches copies; on CUDA each list is also captured once as a CUDA graph
        self._pairs: dict[tuple[str, int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.copies = cfg.get("copies", "graph") if self.cuda else "eager"
        self.graphs = self.copies != "eager"
        self._graphs: dict[tuple[str, int, int], torch.cuda.CUDAGraph] = {}
        self._batched: dict = {}  # key -> BatchedCopy (its tile table), alive with its graph

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
            # A control message from a process of this check's own tree (sent by `send`):
            # tables, CUDA IPC handles, events. Never a file, never a network peer; the
            # weights themselves move through shared device or host memory.
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

    def forget_copies(self) -> None:
        """Drop the views and graphs built from tensors (after a reallocation or registration)."""
        self._pairs.clear()
        self._graphs.clear()
        self._batched.clear()

    def launch(self, key: tuple[str, int, int], pairs) -> None:
        """Launch the copies ``pairs`` (destination, source): on CUDA as one CUDA graph, captured
        the first time ``key`` is launched or prepared, so that an update costs one launch per
        bucket instead of one per tensor (the Python launch of ~1,800 copies took longer than
        the copies: 13 ms against 8 ms for one copy of all the bytes, H200). A graph holds the
        pointers it was captured with: ``forget_copies`` whenever a tensor moves."""
        if not self.graphs or key[0] == "host":  # host: PCIe-bound, and copies stage strided
            for dst, src in pairs:  # sources on the device first (temporaries)
                dst.copy_(src, non_blocking=True)
            return
        self._graph(key, pairs).replay()

    def _graph(self, key, pairs) -> torch.cuda.CUDAGraph:
        g = self._graphs.get(key)
        if g is None:
            if not self._graphs:  # load the copy kernels outside any capture
                for dst, src in pairs:
                    dst.copy_(src, non_blocking=True)
                self.sync()
            batch = None
            if self.copies == "batched":  # one kernel for the whole bucket (cuda_copy.py)
                from fd_ray_sync.cuda_copy import BatchedCopy

                batch = self._batched[key] = BatchedCopy(pairs, self.dev)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                if batch is not None:
                    batch.launch()
                else:
                    for dst, src in pairs:
                        dst.copy_(src, non_blocking=True)
            self._graphs[key] = g
        return g

    def prepare(self, keys) -> None:
        """Capture the graphs of ``keys`` (kind, bucket, slot) before an update is timed."""
        for key in keys:
            self.prepare_pairs(key, self._copies(*key))

    def prepare_pairs(self, key, pairs) -> None:
        if self.graphs and key[0] != "host":
            self._graph(key, pairs)

    def _copies(self, kind: str, j: int, s: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def set_host_plan(self, host_bucket_bytes: int) -> None:
        sizes = [2 * math.prod(part_shape(self.specs[i], p)) for i, p in self.parts]
        self.host_plan = plan_buckets(sizes, host_bucket_bytes)

    def handle(self, cmd: str) -> dict:
        if cmd == "floor":
            out = self.floor()
            self.forget_copies()  # its graph points into the floor's buffers, freed now
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
