"""The trainer's first command: the plain copies every method's time is compared with."""

from __future__ import annotations

import math
import time

import torch

from fd_ray_sync.params import wide_pair

from .plan import TP, GiB, bucket_view, equal_bits, flat_layout, max_or_none
from .proc import ProcBase


class FloorProc(ProcBase):
    """The trainer's memory check and floor copies (the trainer is its only subclass)."""

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
        out["floor"] = {"times_s": times, "ok": ok, "trainer_extra_mib": max_or_none(peaks)}

        pairs = []  # every rank's slices, in one process: registered's copies without IPC
        for i, s in enumerate(self.specs):
            full = bucket_view(src, offsets[i], s.shape)
            for r in range(TP):
                o = offsets[i] + (r * s.nbytes // TP if s.split != "rep" else 0)
                pairs.append(wide_pair(bucket_view(dst, o, s.rank_shape()), s.rank_slice(full, r)))
        self.prepare_pairs(("floor_sliced", 0, 0), pairs)
        times, ok = [], True
        for u in range(updates):
            src.random_(0, 256)
            times.append(self._timed(self.launch, ("floor_sliced", 0, 0), pairs))
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
