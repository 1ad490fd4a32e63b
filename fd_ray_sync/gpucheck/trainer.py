"""The trainer process: the model, the bucket ring, the host ring; it produces every update."""

from __future__ import annotations

import math
import shutil
import time

import torch

from .floor import FloorProc
from .plan import (
    ALIGN,
    PER_LAYER,
    TP,
    VALUE_MASK,
    GiB,
    MiB,
    bucket_view,
    combined_checksum,
    flat_layout,
    hidden_size,
    part_shape,
)
from .proc import Ctl, host_register, host_unregister


class Trainer(FloorProc):
    def __init__(self, *a):
        super().__init__(*a)
        self.model: list[torch.Tensor] = []
        self.retired: list[torch.Tensor] = []  # kept alive: ranks may still hold their handles
        self.moved: list[int] = []
        self.pinned: list[torch.Tensor] = []

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
            why = host_register(b)
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
        if method in ("ring", "ring_hostsync"):
            self.prepare(
                ("ring", j, s) for j in range(len(self.ring_plan)) for s in range(self.ring_slots)
            )
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
                self._produce("ring", u, events)
            elif method == "host":
                self._produce("host", u)
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

    def _produce(self, kind: str, u: int, events: bool = False) -> None:
        """Pack update `u`'s buckets into the `kind` ring ("ring": device buckets; "host":
        pinned host buckets), each slot only once every rank released its last bucket, and
        mark each ready: with an interprocess event (`events`), else after a stream sync
        (the host ring always: its device-to-host copies must land before a rank reads)."""
        plan = self.ring_plan if kind == "ring" else self.host_plan
        slots = self.ring_slots if kind == "ring" else self.host_slots
        what = "slot" if kind == "ring" else "host slot"
        nb = len(plan)
        for j in range(nb):
            g = u * nb + j
            s = g % slots
            if g >= slots:
                released = [Ctl.released(r, s) for r in range(TP)]
                self.wait_until(
                    released, g - slots + 1, f"ranks to release {what} {s} (bucket {g - slots})"
                )
                if events:
                    for r in range(TP):
                        torch.cuda.current_stream().wait_event(self.rel_ev[r][s])
            self.launch((kind, j, s), self._copies(kind, j, s))
            if events:
                self.ready_ev[s].record()
            else:
                self.sync()
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
        self.forget_copies()
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
            host_unregister(b)
