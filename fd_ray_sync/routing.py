"""Sending generation requests straight to the replicas' fronts (actors/front.py).

A `Router` lives in the client (the driver's `Fleet`, the HTTP app): it asks the
coordinator once for the fronts (again every `REFRESH_S`, and when a front is gone), then
sends each request to the next front in turn. A front whose gate is closed answers at once
with its reasons and the router tries the next one; when every gate is closed, it waits at
one closed for an update or a pause (the request passes when the gate opens), and when none
is (every replica down, asleep or cleared) it raises `StateError` with each replica's
reason. One round trip per request while replicas serve; the coordinator is never on the
path.

`generate` blocks (drivers, scripts); `agenerate` is the same for asyncio code (Serve).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

import ray

from actors.front import ACTOR_GONE, HOLDING
from fd_ray_sync.errors import RequestAborted, StateError, WeightSyncError
from fd_ray_sync.messages import GenerationResult

REFRESH_S = 2.0


class Router:
    def __init__(self, coordinator: Any, fleet: str, timeout_s: float = 120.0):
        self.coordinator, self.fleet, self.timeout_s = coordinator, fleet, timeout_s
        self._fronts: list = []
        self._fetched = 0.0
        self._turn = itertools.count()

    # --- which front next ----------------------------------------------------------------

    def _stale(self) -> bool:
        return not self._fronts or time.monotonic() - self._fetched > REFRESH_S

    def _store(self, fronts: list) -> list:
        self._fronts, self._fetched = list(fronts), time.monotonic()
        return self._fronts

    def _order(self, fronts: list, replica: int | None) -> list[int]:
        if not fronts:
            raise StateError(f"fleet {self.fleet} has no replicas (not started, or shut down)")
        if replica is not None:
            if not 0 <= replica < len(fronts):
                raise StateError(f"fleet {self.fleet} has no replica {replica} (dp={len(fronts)})")
            return [replica]
        start = next(self._turn) % len(fronts)
        return [(start + i) % len(fronts) for i in range(len(fronts))]

    def _answer(self, out: dict, replica: int, closed: dict) -> list[GenerationResult] | None:
        """The results, or None after noting why the front turned the request away."""
        if "results" in out:
            return out["results"]
        if "aborted" in out:
            raise RequestAborted(f"fleet {self.fleet}: request aborted: {out['aborted']}")
        closed[replica] = out["closed"]
        return None

    def _waiting_at(self, closed: dict) -> int:
        """A replica whose gate holds requests (closed for an update or pause only), or
        StateError naming why no replica serves."""
        for replica, reasons in closed.items():
            if set(reasons) <= HOLDING:
                return replica
        why = "; ".join(
            f"replica {r}: " + ", ".join(f"{k}: {v}" for k, v in reasons.items())
            for r, reasons in sorted(closed.items())
        )
        raise StateError(f"fleet {self.fleet} is not serving ({why})")

    def _deadline_passed(self, deadline: float, closed: dict) -> None:
        if time.monotonic() > deadline:
            raise StateError(
                f"fleet {self.fleet}: no replica served the request within {self.timeout_s}s "
                f"(closed: {closed})"
            )

    # --- blocking ------------------------------------------------------------------------

    def fronts(self) -> list:
        if self._stale():
            self._store(ray.get(self.coordinator.fronts.remote(), timeout=30))
        return self._fronts

    def generate(
        self, prompts: Sequence[str], max_new_tokens: int, replica: int | None = None
    ) -> list[GenerationResult]:
        deadline = time.monotonic() + self.timeout_s
        while True:
            fronts, closed = self.fronts(), {}
            for r in self._order(fronts, replica):
                out = self._call(fronts[r], prompts, max_new_tokens, hold=False)
                if out is not None and (results := self._answer(out, r, closed)) is not None:
                    return results
            if closed:
                r = self._waiting_at(closed)
                out = self._call(fronts[r], prompts, max_new_tokens, hold=True)
                if out is not None and (results := self._answer(out, r, closed)) is not None:
                    return results
            self._deadline_passed(deadline, closed)
            time.sleep(0.05)

    def _call(self, front, prompts, max_new_tokens, hold: bool) -> dict | None:
        try:
            return ray.get(front.generate.remote(list(prompts), max_new_tokens, hold))
        except ACTOR_GONE:
            self._fronts = []  # scaled away or restarting: ask the coordinator again
            return None
        except ray.exceptions.RayTaskError as e:
            raise _cause(e) from None

    # --- asyncio -------------------------------------------------------------------------

    async def afronts(self) -> list:
        if self._stale():
            self._store(await self.coordinator.fronts.remote())
        return self._fronts

    async def agenerate(
        self, prompts: Sequence[str], max_new_tokens: int, replica: int | None = None
    ) -> list[GenerationResult]:
        deadline = time.monotonic() + self.timeout_s
        while True:
            fronts, closed = await self.afronts(), {}
            for r in self._order(fronts, replica):
                out = await self._acall(fronts[r], prompts, max_new_tokens, hold=False)
                if out is not None and (results := self._answer(out, r, closed)) is not None:
                    return results
            if closed:
                r = self._waiting_at(closed)
                out = await self._acall(fronts[r], prompts, max_new_tokens, hold=True)
                if out is not None and (results := self._answer(out, r, closed)) is not None:
                    return results
            self._deadline_passed(deadline, closed)
            await _asleep(0.05)

    async def _acall(self, front, prompts, max_new_tokens, hold: bool) -> dict | None:
        try:
            return await front.generate.remote(list(prompts), max_new_tokens, hold)
        except ACTOR_GONE:
            self._fronts = []
            return None
        except ray.exceptions.RayTaskError as e:
            raise _cause(e) from None


def _cause(e: ray.exceptions.RayTaskError) -> Exception:
    return e.cause if isinstance(e.cause, WeightSyncError) else e


async def _asleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)
