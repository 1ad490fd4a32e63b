"""A rank process: its TP slices of every tensor, allocated once and written in place."""

from __future__ import annotations

import time

import torch

from fd_ray_sync.params import wide_pair

from .plan import MiB, bucket_view, combined_checksum, equal_bits
from .proc import Ctl, ProcBase, StaleRegistrationError, host_register, host_unregister


class Rank(ProcBase):
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
                why = host_register(b)
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
        if method in ("ring", "ring_hostsync"):
            self.prepare(
                ("ring", j, s) for j in range(len(self.ring_plan)) for s in range(self.ring_slots)
            )
        elif method == "registered":
            self.prepare([("registered", 0, 0)])
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
                    self.launch(("registered", 0, 0), self._copies("registered", 0, 0))
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
                self.forget_copies()
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
            self.launch(("ring", j, s), self._copies("ring", j, s))  # strided 2-D for columns
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
            self.launch(("host", j, s), self._copies("host", j, s))
            self.sync()  # the host bucket may be refilled once RELEASED is set
            self.ctl.set(Ctl.released(r, s), g + 1)

    def _copies(self, kind: str, j: int, s: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(param, source view) for bucket j in slot s, or for the trainer's own tensors; a
        strided column slice is viewed as wider integers (``wide_pair``)."""
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
            self._pairs[key] = [wide_pair(dst, src) for dst, src in pairs]
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
            host_unregister(b)
