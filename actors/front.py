"""ReplicaFrontActor: one per replica, the door its generation requests come through.

Requests go from the client (`fd_ray_sync.routing.Router`: the driver's `Fleet.generate`,
the HTTP app) straight to a replica's front, never through the coordinator, so replicas
serve at once. The front batches what arrives while a batch runs (one engine call on every
TP rank of the replica, in the same order on each: the ranks' collectives line up) and
answers each request with the version every rank reported.

The front has a gate. It is open while nothing is named in `closed`; the coordinator closes
it before it touches the replica's ranks (an update's pause, a rebuild, clear, sleep) and
opens it after, so no batch runs while weights change and every answer comes from one
committed version. A close drains the batch in flight as its pause mode says:

    abort  answer the requests in flight and queued at once ("aborted"); the ranks are
           told to stop, end the engine call at the next token, all at the same step (an
           engine that honours `stop`; see InferenceEngine.generate), and the close returns
    wait   let the batch in flight finish on the weights it started on; queued ones wait
    keep   put the batch in flight back at the head of the queue and stop the engine call
           as abort does: after the gate opens it runs again from the start, on the new
           weights (its answer names that version)

While the gate is closed for an update, a user's pause or a repair (`HOLDING`) new requests
wait at the gate, up to the request timeout; for any other reason (the replica is down, asleep,
cleared) they are turned away at once with the reasons, and the router tries another
replica. A batch that loses a rank (dead, hung past the timeout, not set up) closes the gate
("repair"), turns its requests away to be retried elsewhere, and asks the coordinator to
repair the replica; the coordinator opens the gate again when it serves (or says "down").
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

import ray

from fd_ray_sync import metrics
from fd_ray_sync.errors import ConfigError, StateError, VerificationError
from fd_ray_sync.messages import GenerationResult

PAUSE_MODES = ("abort", "wait", "keep")
PEER_GRACE_S = 2.0  # after one rank's error, how long the others may take to say why
# Reasons a closed gate holds new requests for (they pass once it opens); any other reason
# turns them away so the router tries another replica.
HOLDING = frozenset({"update", "pause", "repair"})
# What a call on an actor raises when it is dead or being restarted.
ACTOR_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
# What a call on a rank raises when its replica cannot serve: dead, restarting, not set up.
REPLICA_DOWN = (
    *ACTOR_GONE,
    asyncio.TimeoutError,
    StateError,
    VerificationError,
)


def _errors(calls) -> list[BaseException]:
    return [_cause(c.exception()) for c in calls if not c.cancelled() and c.exception()]


def _cause(error: BaseException) -> BaseException:
    """A rank's own error, out of the RayTaskError that carried it."""
    return error.cause if isinstance(error, ray.exceptions.RayTaskError) else error


def front_actor_name(fleet: str, replica: int) -> str:
    return f"{fleet}.front{replica}"


def check_pause_mode(mode: str) -> str:
    if mode not in PAUSE_MODES:
        raise ConfigError(f"pause mode {mode!r} is not one of {', '.join(PAUSE_MODES)}")
    return mode


@dataclass
class _Request:
    prompts: list[str]
    max_new_tokens: int
    answer: asyncio.Future
    started: bool = field(default=False)


# Not restarted by Ray: a restart waits forever once the replica's placement group is gone
# (the front is detached, and would outlive a driver that died). A dead front is replaced
# by the coordinator when a client finds it gone (`replace_front`).
@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=10_000)
class ReplicaFrontActor:
    def __init__(
        self, fleet: str, replica: int, max_batch: int, timeout_s: float, coordinator=None
    ):
        self.fleet, self.replica = fleet, replica
        self.max_batch, self.timeout_s = max_batch, timeout_s
        self.coordinator = coordinator
        self.ranks: list = []
        self.closed: dict[str, str] = {"down": "not set up yet"}
        self.queue: deque[_Request] = deque()
        self.inflight: list[_Request] = []
        self.batches = 0
        self._work: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def _start(self) -> None:
        if self._task is None:
            self._work, self._idle = asyncio.Event(), asyncio.Event()
            self._idle.set()
            self._task = asyncio.get_running_loop().create_task(self._serve())

    # --- requests ------------------------------------------------------------------------

    async def generate(self, prompts: list[str], max_new_tokens: int, hold: bool = True) -> dict:
        """`{"results": [GenerationResult]}`, `{"closed": reasons}` (turned away: try
        another replica) or `{"aborted": why}` (a pause in mode abort took it)."""
        self._start()
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ConfigError("prompts must be a non-empty list of strings")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a positive integer, not {max_new_tokens!r}")
        if self.closed:
            metrics.requests(self.fleet, "paused")
            if not hold or not self._holding():
                return {"closed": dict(self.closed)}
        request = _Request(
            list(prompts), max_new_tokens, asyncio.get_running_loop().create_future()
        )
        self.queue.append(request)
        self._work.set()
        done, _ = await asyncio.wait({request.answer}, timeout=self.timeout_s)
        if not done and not request.started:  # held past the timeout: give it back
            self.queue.remove(request)
            return {"closed": dict(self.closed) or {"busy": f"queued over {self.timeout_s}s"}}
        try:
            out = await request.answer
        except Exception:
            metrics.requests(self.fleet, "failed")
            raise
        if "results" in out:
            metrics.requests(self.fleet, "served")
        return out

    def _holding(self) -> bool:
        return set(self.closed) <= HOLDING

    async def _serve(self) -> None:
        while True:
            await self._work.wait()
            self._work.clear()
            while self.queue and not self.closed:
                await self._run(self._take())

    def _take(self) -> list[_Request]:
        """The head of the queue and the queued requests with its token budget, up to
        `max_batch` prompts (one engine call runs one budget)."""
        head = self.queue.popleft()
        batch, size = [head], len(head.prompts)
        for request in list(self.queue):
            if request.max_new_tokens == head.max_new_tokens:
                if size + len(request.prompts) > self.max_batch:
                    break
                self.queue.remove(request)
                batch.append(request)
                size += len(request.prompts)
        return batch

    async def _run(self, batch: list[_Request]) -> None:
        for request in batch:
            request.started = True
        self.inflight = batch
        self._idle.clear()
        prompts = [p for r in batch for p in r.prompts]
        calls = [
            asyncio.ensure_future(a.generate.remote(prompts, batch[0].max_new_tokens))
            for a in self.ranks
        ]
        try:
            outs = await self._answers(calls)
            versions = {o["version"] for o in outs}
            if len(versions) != 1:
                raise VerificationError(
                    f"replica {self.replica}'s ranks answered from versions {sorted(versions)}"
                )
            error = None
        except Exception as e:  # noqa: BLE001 - sorted below: the replica's or the request's
            error = _cause(e)
        finally:
            self._idle.set()
        self.batches += 1
        batch, self.inflight = self.inflight, []  # what a close left to answer
        if error is None:
            texts, version, at = outs[0]["texts"], outs[0]["version"], 0
            for request in batch:
                results = [
                    GenerationResult(prompt=p, text=t, version=version, replica=self.replica)
                    for p, t in zip(request.prompts, texts[at : at + len(request.prompts)])
                ]
                at += len(request.prompts)
                _answer(request, {"results": results})
        elif isinstance(error, REPLICA_DOWN):
            why = f"a rank failed while serving: {type(error).__name__}: {error}"
            self.closed["repair"] = why
            self._turn_away(batch)
            if self.coordinator is not None:
                self.coordinator.repair.remote(self.replica, why)
        else:
            for request in batch:
                if not request.answer.done():
                    request.answer.set_exception(error)

    async def _answers(self, calls: list[asyncio.Future]) -> list:
        """Every rank's answer, or the error that says most: a rank that dies mid-call fails
        its TP peers' collectives too (gloo: "Connection reset by peer"), and a peer's error
        can come first, so after a first error the others get `PEER_GRACE_S` to tell whether
        a rank is gone (the replica is down) rather than the request bad."""
        for call in calls:  # errors of calls left running are read, not warned about
            call.add_done_callback(lambda c: c.cancelled() or c.exception())
        done, pending = await asyncio.wait(
            calls, timeout=self.timeout_s, return_when=asyncio.FIRST_EXCEPTION
        )
        errors = _errors(done)
        if errors and pending:
            more, pending = await asyncio.wait(pending, timeout=PEER_GRACE_S)
            errors += _errors(more)
        if errors:
            raise next((e for e in errors if isinstance(e, REPLICA_DOWN)), errors[0])
        if pending:
            raise asyncio.TimeoutError(f"replica {self.replica}: no answer in {self.timeout_s}s")
        return [c.result() for c in calls]

    def _turn_away(self, extra: list[_Request] = ()) -> None:
        """Answer the queue (and `extra`) with the gate's reasons, to be tried elsewhere."""
        waiting = [*extra, *self.queue]
        self.queue.clear()
        for request in waiting:
            _answer(request, {"closed": dict(self.closed)})

    # --- the gate (the coordinator's, and a user's pause) --------------------------------

    async def close(self, reason: str, why: str, mode: str = "wait") -> bool:
        """Close the gate for `reason`, drain the batch in flight as `mode` says, and
        return once no batch runs on the ranks (True), or after the timeout (False)."""
        self._start()
        check_pause_mode(mode)
        self.closed[reason] = why
        inflight, self.inflight = self.inflight, []
        if inflight and mode != "wait":  # its answer is dropped: end the engine call early
            await self._interrupt()
        if mode == "abort":
            for request in [*inflight, *self.queue]:
                _answer(request, {"aborted": f"replica {self.replica}: {why}"})
            self.queue.clear()
        elif mode == "keep":
            for request in reversed(inflight):
                request.started = False
                self.queue.appendleft(request)
        else:
            self.inflight = inflight
        if not self._holding():
            self._turn_away()
        try:
            await asyncio.wait_for(self._idle.wait(), self.timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def _interrupt(self) -> None:
        try:
            calls = [a.interrupt.remote() for a in self.ranks]
            await asyncio.wait_for(asyncio.gather(*calls), self.timeout_s)
        except Exception:  # noqa: BLE001 - a rank that cannot be told finishes the call
            pass

    async def open(self, reason: str) -> None:
        self._start()
        self.closed.pop(reason, None)
        self._work.set()

    async def set_state(self, ranks: list, down: str | None, reopen: tuple[str, ...] = ()) -> None:
        """The coordinator's view: the replica's rank handles, why it does not serve (None:
        it serves), and reasons to lift (an update that ended)."""
        self._start()
        self.ranks = list(ranks)
        for reason in reopen:
            self.closed.pop(reason, None)
        if down is None:
            self.closed.pop("down", None)
        else:
            self.closed["down"] = down
            self._turn_away()
        self._work.set()

    async def state(self) -> dict:
        return {
            "replica": self.replica,
            "open": not self.closed,
            "closed": dict(self.closed),
            "queued": len(self.queue),
            "in_flight": len(self.inflight),
            "batches": self.batches,
        }


def _answer(request: _Request, out: dict) -> None:
    if not request.answer.done():
        request.answer.set_result(out)
