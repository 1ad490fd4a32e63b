"""Sending generation requests straight to the replicas' fronts (actors/front.py).

A `Router` lives in the client (the driver's `Fleet`, the HTTP app): it asks the
coordinator once for the fronts (again every `REFRESH_S`, and when a front is gone), then
sends each request to the next front in turn. A front whose gate is closed answers at once
with its reasons and the router tries the next one; when every gate is closed, it waits at
one closed for an update or a pause (the request passes when the gate opens), and when none
is (every replica down, asleep or cleared) it raises `StateError` with each replica's
reason. One round trip per request while replicas serve; the coordinator is never on the
path: while it cannot answer (restarting after a crash), the fronts already known serve on
(they and the ranks outlive it), and a router that knows none waits for it, up to its
timeout.

`generate` blocks (drivers, scripts); `agenerate` is the same for asyncio code (Serve).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from typing import Any

import ray

from actors.front import ACTOR_GONE, HOLDING
from fd_ray_sync.errors import RequestAborted, StateError, WeightSyncError
from fd_ray_sync.messages import GenerationResult

REFRESH_S = 2.0
# How long a refresh waits for the coordinator when fronts are known (they serve meanwhile).
REFRESH_WAIT_S = 1.0
# What asking a coordinator that is restarting (or gone, or stuck) raises.
COORDINATOR_DOWN = (
    ray.exceptions.RayActorError,
    ray.exceptions.ActorUnavailableError,
    ray.exceptions.GetTimeoutError,
    asyncio.TimeoutError,  # TimeoutError from Python 3.11 on
)


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

    def _unanswered(self, error: Exception) -> list | None:
        """The coordinator did not answer: the known fronts serve on (asked again after
        `REFRESH_S`); None when none is known and it may come back (restarting, slow)."""
        if not self._fronts and isinstance(error, ray.exceptions.ActorDiedError):
            raise StateError(
                f"fleet {self.fleet}: its coordinator is gone (the fleet was shut down, or "
                f"its driver's job ended): {error}"
            ) from None
        self._fetched = time.monotonic()
        return self._fronts or None

    def _refresh_wait(self) -> float:
        return REFRESH_WAIT_S if self._fronts else 30.0

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

    def _gone(self, replica: int) -> None:
        """The replica's front is gone (scaled away, or its process died): the coordinator
        puts a new one there if the replica is still meant to be, and is asked again."""
        self._fronts = []
        self.coordinator.replace_front.remote(replica)  # answered by replacing, or nothing

    def _deadline_passed(self, deadline: float, closed: dict) -> None:
        if time.monotonic() > deadline:
            raise StateError(
                f"fleet {self.fleet}: no replica served the request within {self.timeout_s}s "
                f"(closed: {closed})"
            )

    def _no_fronts(self, deadline: float) -> None:
        if time.monotonic() > deadline:
            raise StateError(
                f"fleet {self.fleet}: its coordinator did not answer within {self.timeout_s}s "
                "and no replica's front is known (is the fleet up?)"
            )

    # --- blocking ------------------------------------------------------------------------

    def fronts(self) -> list | None:
        """The fronts to send to; None while the coordinator cannot say and none is known."""
        if self._stale():
            try:
                call = self.coordinator.fronts.remote()
                return self._store(ray.get(call, timeout=self._refresh_wait()))
            except COORDINATOR_DOWN as e:
                return self._unanswered(e)
        return self._fronts

    def generate(
        self, prompts: Sequence[str], max_new_tokens: int, replica: int | None = None
    ) -> list[GenerationResult]:
        deadline = time.monotonic() + self.timeout_s
        while True:
            fronts, closed = self.fronts(), {}
            if fronts is None:
                self._no_fronts(deadline)
                time.sleep(0.2)
                continue
            for r in self._order(fronts, replica):
                out = self._call(fronts, r, prompts, max_new_tokens, hold=False)
                if out is not None and (results := self._answer(out, r, closed)) is not None:
                    return results
            if closed:
                r = self._waiting_at(closed)
                out = self._call(fronts, r, prompts, max_new_tokens, hold=True)
                if out is not None and (results := self._answer(out, r, closed)) is not None:
                    return results
            self._deadline_passed(deadline, closed)
            time.sleep(0.05)

    def _call(self, fronts, replica, prompts, max_new_tokens, hold: bool) -> dict | None:
        try:
            return ray.get(fronts[replica].generate.remote(list(prompts), max_new_tokens, hold))
        except ACTOR_GONE:
            self._gone(replica)
            return None
        except ray.exceptions.RayTaskError as e:
            raise _cause(e) from None

    # --- asyncio -------------------------------------------------------------------------

    async def afronts(self) -> list | None:
        if self._stale():
            try:
                call = self.coordinator.fronts.remote()
                return self._store(await asyncio.wait_for(call, self._refresh_wait()))
            except COORDINATOR_DOWN as e:
                return self._unanswered(e)
        return self._fronts

    async def agenerate(
        self, prompts: Sequence[str], max_new_tokens: int, replica: int | None = None
    ) -> list[GenerationResult]:
        deadline = time.monotonic() + self.timeout_s
        while True:
            fronts, closed = await self.afronts(), {}
            if fronts is None:
                self._no_fronts(deadline)
                await asyncio.sleep(0.2)
                continue
            for r in self._order(fronts, replica):
                out = await self._acall(fronts, r, prompts, max_new_tokens, hold=False)
                if out is not None and (results := self._answer(out, r, closed)) is not None:
                    return results
            if closed:
                r = self._waiting_at(closed)
                out = await self._acall(fronts, r, prompts, max_new_tokens, hold=True)
                if out is not None and (results := self._answer(out, r, closed)) is not None:
                    return results
            self._deadline_passed(deadline, closed)
            await asyncio.sleep(0.05)

    async def _acall(self, fronts, replica, prompts, max_new_tokens, hold: bool) -> dict | None:
        try:
            return await fronts[replica].generate.remote(list(prompts), max_new_tokens, hold)
        except ACTOR_GONE:
            self._gone(replica)
            return None
        except ray.exceptions.RayTaskError as e:
            raise _cause(e) from None


def _cause(e: ray.exceptions.RayTaskError) -> Exception:
    return e.cause if isinstance(e.cause, WeightSyncError) else e
