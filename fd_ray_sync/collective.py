"""The weight-sync group of the collective transport: the trainer and every rank, one chain.

A torch.distributed process group created outside the default group (gloo on CPU, NCCL on
GPUs; the ranks' TP/EP worlds are paddle's and stay untouched), on a TCPStore the trainer
hosts. Members are numbered along a chain: member 0 is the trainer, then the ranks on the
trainer's node, then each other node's ranks together (`chain_order`). A bucket travels
the chain in pieces, each member forwarding piece j to the next while piece j+1 arrives:

    trainer --p0 p1 p2--> rank 0 --p0 p1--> rank 1 ==link==> rank 2 --p0--> rank 3
                          (trainer's node)                   (next node)

so every node's link carries the model once in and at most once out (a pipelined broadcast,
as NCCL's ring broadcast does), and the time is about model / slowest link plus one piece
per hop. A group is created once (every member joins while the update's prepare runs) and
kept; it is rebuilt under a new key when the members change or an update failed (a failed
update may leave sends unmatched). Gloo runs send/recv asynchronously, but its send/recv
works have no futures and an interrupted wait cannot be resumed, so waits poll
`is_completed()` and let the caller abort (the update's feed closed) between polls.

Ray-free; torch is imported here only (install the `collective` extra).
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from fd_ray_sync.errors import ConfigError, StateError

PIECE_BYTES = 4 << 20  # a hop's latency is one piece; 4 MiB keeps per-op overhead small
WINDOW = 4  # receives posted ahead of the one being waited for
POLL_S = 0.5  # how often a wait asks whether the update was given up


@dataclass(frozen=True)
class GroupInfo:
    """Where a weight-sync group rendezvous and who is in it (sent to every rank)."""

    host: str  # the trainer's TCPStore
    port: int
    key: str  # this group's generation (its keys in the store)
    ranks: tuple[int, ...]  # chain order of the fleet's ranks; member i + 1 is ranks[i]
    backend: str = "gloo"
    timeout_s: float = 120.0

    @property
    def size(self) -> int:
        return len(self.ranks) + 1

    def member_of(self, rank: int) -> int:
        try:
            return self.ranks.index(rank) + 1
        except ValueError:
            raise StateError(f"rank {rank} is not in weight-sync group {self.key}") from None

    def who(self, member: int) -> str:
        return "the trainer" if member == 0 else f"rank {self.ranks[member - 1]}"


def chain_order(nodes: Mapping[int, str], trainer_node: str | None) -> tuple[int, ...]:
    """Ranks in chain order: those on the trainer's node first, then each other node's
    ranks together, nodes in order of their lowest rank (one link crossing per node)."""
    order: list[str] = []
    for rank in sorted(nodes):
        if nodes[rank] not in order:
            order.append(nodes[rank])
    if trainer_node in order:
        order.remove(trainer_node)
        order.insert(0, trainer_node)
    return tuple(r for node in order for r in sorted(r for r in nodes if nodes[r] == node))


def pieces(nbytes: int, piece: int = PIECE_BYTES) -> list[tuple[int, int]]:
    """(offset, size) of each piece of an `nbytes` bucket."""
    return [(o, min(piece, nbytes - o)) for o in range(0, nbytes, piece)]


def is_available() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    return dist.is_available()


def _torch():
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        raise ConfigError(
            "the collective transport needs torch (pip install 'fd-ray-sync[collective]')"
        ) from None
    return torch, dist


Aborted = Callable[[], str | None]
"""Polled while waiting: a reason to stop (the update failed elsewhere), or None."""


class _Waiter:
    """Runs a blocking wait on group operations in a thread. Gloo's send/recv works have
    no futures and `is_completed()` turns true only once someone waited on them, while a
    wait with a timeout cancels the operation: so a thread waits, and the caller polls
    the thread, free to give up on it."""

    def __init__(self, wait: Callable[[], object]):
        self.error: BaseException | None = None
        self.value: object = None
        self._wait = wait
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.value = self._wait()
        except BaseException as e:  # noqa: BLE001 - raised by `result`
            self.error = e

    def result(self, what: str, timeout_s: float, aborted: Aborted) -> object:
        deadline = time.monotonic() + timeout_s
        while self.thread.is_alive():
            self.thread.join(POLL_S)
            if not self.thread.is_alive():
                break
            if reason := aborted():
                raise StateError(f"{what}: stopped ({reason})")
            if time.monotonic() > deadline:
                raise StateError(f"{what}: no progress within {timeout_s:g}s")
        if self.error is not None:
            raise StateError(f"{what}: {type(self.error).__name__}: {self.error}") from None
        return self.value


class SyncGroup:
    """This process's membership of one weight-sync group.

    `store` is given on the trainer (it hosts it); ranks connect to `info.host:info.port`.
    Creating it blocks until every member joined (gloo connects the full mesh), at most
    `info.timeout_s`.
    """

    def __init__(self, info: GroupInfo, member: int, host: str, store=None):
        torch, dist = _torch()
        self.info, self.member = info, member
        timeout = datetime.timedelta(seconds=info.timeout_s)
        if store is None:
            store = dist.TCPStore(info.host, info.port, None, False, timeout)
        prefixed = dist.PrefixStore(f"fd-ray-sync/{info.key}", store)
        if info.backend == "gloo":
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = timeout
            # The member's own address (a node in a network namespace has no route for
            # the hostname's); full mesh at creation: a lazily connecting group could not
            # connect again after an aborted receive (seen with torch 2.13).
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
            self.pg = dist.ProcessGroupGloo(prefixed, member, info.size, opts)
            self.device = "cpu"
        elif info.backend == "nccl":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(prefixed, member, info.size, opts)
            self.device = f"cuda:{torch.cuda.current_device()}"
        else:
            raise ConfigError(f"unknown weight-sync backend {info.backend!r} (gloo or nccl)")
        self._torch = torch
        self._buffers: list = []

    @property
    def prev(self) -> int | None:
        return self.member - 1 if self.member > 0 else None

    @property
    def next(self) -> int | None:
        return self.member + 1 if self.member + 1 < self.info.size else None

    def buffers(self, count: int, nbytes: int) -> list:
        """`count` receive buffers of at least `nbytes`, allocated once and kept."""
        if len(self._buffers) != count or self._buffers[0].numel() < nbytes:
            self._buffers = [
                self._torch.empty(nbytes, dtype=self._torch.uint8, device=self.device)
                for _ in range(count)
            ]
        return self._buffers

    def _wait(self, works: Sequence, what: str, aborted: Aborted) -> None:
        """Wait for `works`, polling `aborted` and the deadline: the waiting itself runs in
        a thread, which an abort abandons (it ends at the group's timeout)."""
        if works:
            waiter = _Waiter(lambda: [w.wait() for w in works])
            waiter.result(what, self.info.timeout_s, aborted)

    def send(self, buf, nbytes: int, tag: int) -> list:
        """Post every piece of `buf[:nbytes]` to the next member (the trainer's side)."""
        return [
            self.pg.send([buf[o : o + n]], self.next, (tag << 16) | j)
            for j, (o, n) in enumerate(pieces(nbytes))
        ]

    def wait_sent(self, works: Sequence, aborted: Aborted) -> None:
        self._wait(works, f"sending to {self.info.who(self.next)}", aborted)

    def relay(self, buf, nbytes: int, tag: int) -> None:
        """Receive `buf[:nbytes]` from the previous member piece by piece, forwarding each
        piece to the next member as soon as it landed; returns once all of it arrived and
        went on. Blocks (at most the group's timeout): run it in a `_Waiter`."""
        parts = pieces(nbytes)
        prev, nxt = self.prev, self.next
        recvs, sends = {}, []

        def post(j: int) -> None:
            if j < len(parts):
                o, n = parts[j]
                recvs[j] = self.pg.recv([buf[o : o + n]], prev, (tag << 16) | j)

        for j in range(WINDOW):
            post(j)
        for j, (o, n) in enumerate(parts):
            recvs.pop(j).wait()
            post(j + WINDOW)
            if nxt is not None:
                sends.append(self.pg.send([buf[o : o + n]], nxt, (tag << 16) | j))
        for work in sends:
            work.wait()

    def receive(self, buf, nbytes: int, tag: int) -> _Waiter:
        """Start receiving (and forwarding) one bucket; `.result(...)` waits for it."""
        return _Waiter(lambda: self.relay(buf, nbytes, tag))

    def close(self) -> None:
        """Leave the group (pending operations are dropped with it)."""
        self._buffers = []
        # Dropped, not aborted: a thread may still wait on one of its operations (until
        # the group's timeout), and the group goes with the last reference.
        self.pg = None


_lock = threading.Lock()
_joined: dict[str, SyncGroup] = {}


def join(info: GroupInfo, rank: int, host: str, aborted: Aborted) -> SyncGroup:
    """This rank's membership of `info`'s group: the one kept from an earlier update, or a
    new one (waits until every member joined, or the update was given up: a peer that died
    before joining would otherwise hold everyone until the group's timeout); a group under
    another key is left."""
    with _lock:
        group = _joined.get(info.key)
        if group is not None:
            return group
        for old in _joined.values():
            old.close()
        _joined.clear()
        forming = _Waiter(lambda: SyncGroup(info, info.member_of(rank), host))
        group = forming.result(f"joining weight-sync group {info.key}", info.timeout_s, aborted)
        _joined[info.key] = group
        return group


def leave(key: str | None = None) -> None:
    """Leave the group `key` (any, when None): the next update joins a new one."""
    with _lock:
        for k in [k for k in _joined if key is None or k == key]:
            _joined.pop(k).close()


class TrainerEnd:
    """The trainer's side: the TCPStore it hosts for every group, and its current group.

    `prepare(ranks)` names the group for the fleet's current ranks (the same key while
    they are the same processes and no update failed) and starts joining it in a thread,
    since joining blocks until every rank joined too (in the update's prepare phase)."""

    def __init__(self, host: str, backend: str, timeout_s: float):
        _, dist = _torch()
        self.host, self.backend, self.timeout_s = host, backend, timeout_s
        self.store = dist.TCPStore(
            host, 0, None, True, datetime.timedelta(seconds=timeout_s), wait_for_workers=False
        )
        self.info: GroupInfo | None = None
        self.group: SyncGroup | None = None
        self._joining: threading.Thread | None = None
        self._error: BaseException | None = None
        self._generation = 0

    def prepare(self, ranks: tuple[int, ...], pids: Mapping[int, int]) -> GroupInfo:
        members = tuple((r, pids[r]) for r in ranks)
        if self.info is not None and self._members == members:
            return self.info
        self.close()
        self._generation += 1
        self._members = members
        digest = abs(hash(members)) % 10**8
        self.info = GroupInfo(
            host=self.host,
            port=self.store.port,
            key=f"g{self._generation}-{digest}",
            ranks=ranks,
            backend=self.backend,
            timeout_s=self.timeout_s,
        )
        self._error = None
        self._joining = threading.Thread(target=self._join, args=(self.info,), daemon=True)
        self._joining.start()
        return self.info

    def _join(self, info: GroupInfo) -> None:
        try:
            group = SyncGroup(info, 0, self.host, self.store)
        except BaseException as e:  # noqa: BLE001 - raised by `joined`
            self._error = e
            return
        if self.info is info:
            self.group = group
        else:  # a later update gave up on this group while it formed
            group.close()

    def joined(self, aborted: Aborted) -> SyncGroup:
        """The group, once every member joined."""
        deadline = time.monotonic() + self.timeout_s
        while self._joining is not None and self._joining.is_alive():
            self._joining.join(0.5)
            if reason := aborted():
                raise StateError(f"the weight-sync group was not formed: {reason}")
            if time.monotonic() > deadline:
                raise StateError(
                    f"the ranks did not join the weight-sync group within {self.timeout_s:g}s"
                )
        if self._error is not None or self.group is None:
            raise StateError(f"the weight-sync group was not formed: {self._error}")
        return self.group

    def failed(self) -> None:
        """An update failed: sends may be unmatched, the next update forms a new group."""
        self.close()

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
        self.group, self.info = None, None
