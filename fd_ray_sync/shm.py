"""POSIX shared-memory segments: the CPU twin of CUDA IPC for the co-located transport.

A segment is a file in /dev/shm mapped by every process that uses it. Its owner (the trainer)
creates it once; a rank attaches it by name once and keeps the mapping across updates
(`attach` caches it), as it would keep an opened CUDA IPC handle. Names carry the owner's pid:

    /dev/shm/fdrs-<owner pid>-<token>-<what>        e.g. fdrs-4711-9f2c1e-ring3

A segment outlives a SIGKILLed owner as a file. Every process that creates or attaches
segments first runs `sweep()`, which unlinks the segments of owners that no longer run and
drops this process's mappings of them, so a dead trainer leaves nothing behind once a rank
or a new trainer on that node moves on. An owner that exits normally unlinks its own
(`Segment.unlink`, and an exit hook for the ones still there).

Pids are those of this node's pid namespace: ranks and trainer of one fleet node see the
same /dev/shm and the same pids (Ray runs them in one host namespace).
"""

from __future__ import annotations

import atexit
import mmap
import os
import re
import secrets
import threading

import numpy as np

from fd_ray_sync.errors import StateError

SHM_DIR = "/dev/shm"
PREFIX = "fdrs-"
ALIGN = 64  # bytes: every tensor placed in a segment starts on a cache line
_NAME = re.compile(r"^fdrs-(\d+)-[0-9a-f]+-[\w.]+$")

_lock = threading.Lock()
_attached: dict[str, Segment] = {}  # name -> this process's mapping (ranks)
_owned: dict[str, Segment] = {}  # name -> segments this process created and must unlink


def _path(name: str) -> str:
    if not _NAME.match(name):
        raise StateError(f"{name!r} is not an fd-ray-sync shared-memory segment name")
    return os.path.join(SHM_DIR, name)


def owner_of(name: str) -> int:
    """The pid of the process that created segment `name`."""
    match = _NAME.match(name)
    if match is None:
        raise StateError(f"{name!r} is not an fd-ray-sync shared-memory segment name")
    return int(match.group(1))


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, killed and not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")


class Segment:
    """One mapped segment. `array(offset, nbytes)` views its bytes (no copy)."""

    def __init__(self, name: str, nbytes: int, create: bool):
        path = _path(name)
        if create:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, nbytes)
            except BaseException:
                os.close(fd)
                os.unlink(path)
                raise
        else:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                alive = "alive" if pid_alive(owner_of(name)) else "dead"
                raise StateError(
                    f"shared-memory segment {name} is not on this node (its owner, pid "
                    f"{owner_of(name)}, is {alive} here): the ipc transport needs the trainer "
                    "on the ranks' node"
                ) from None
            nbytes = os.fstat(fd).st_size
        try:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if create else 0)
            self._map = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, prot) if nbytes else None
        finally:
            os.close(fd)
        self.name, self.nbytes, self.owned = name, nbytes, create
        self.buffer = (
            np.frombuffer(self._map, np.uint8) if self._map is not None else np.empty(0, np.uint8)
        )
        if not create:
            self.buffer.flags.writeable = False

    @property
    def address(self) -> int:
        return self.buffer.__array_interface__["data"][0]

    def array(self, offset: int, nbytes: int) -> np.ndarray:
        if offset < 0 or offset + nbytes > self.nbytes:
            raise StateError(
                f"bytes [{offset}, {offset + nbytes}) are outside segment {self.name} "
                f"({self.nbytes} bytes)"
            )
        return self.buffer[offset : offset + nbytes]

    def close(self) -> None:
        """Drop this mapping. Views still held elsewhere keep the memory mapped until they
        go (the kernel frees it once the file is unlinked and the last mapping is gone)."""
        self.buffer = np.empty(0, np.uint8)
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # a view is still exported: the mapping goes with the last one
            self._map = None

    def unlink(self) -> None:
        with _lock:
            _owned.pop(self.name, None)
        try:
            os.unlink(_path(self.name))
        except FileNotFoundError:
            pass
        self.close()


def create(what: str, nbytes: int) -> Segment:
    """A new segment owned by this process (unlinked at exit if still there)."""
    sweep()
    name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(6)}-{what}"
    segment = Segment(name, nbytes, create=True)
    with _lock:
        _owned[name] = segment
    return segment


def unlink(name: str) -> None:
    """Remove a segment this process created (its memory goes with the last mapping)."""
    with _lock:
        segment = _owned.get(name)
    if segment is None:
        raise StateError(f"segment {name} was not created by this process")
    segment.unlink()


def attach(name: str) -> Segment:
    """This process's read-only mapping of segment `name`, opened once and kept."""
    with _lock:
        segment = _attached.get(name)
    if segment is not None:
        return segment
    sweep()
    segment = Segment(name, 0, create=False)
    with _lock:
        return _attached.setdefault(name, segment)


def release(names: set[str] | None = None) -> None:
    """Close this process's mappings of `names` (all when None)."""
    with _lock:
        gone = [n for n in _attached if names is None or n in names]
        segments = [_attached.pop(n) for n in gone]
    for segment in segments:
        segment.close()


def sweep() -> list[str]:
    """Unlink every fd-ray-sync segment on this node whose owner is dead, and close this
    process's mappings of them and of segments their owner unlinked. Returns the names
    removed."""
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    dead = []
    for name in names:
        match = _NAME.match(name)
        if match and not pid_alive(int(match.group(1))):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except FileNotFoundError:
                continue
            dead.append(name)
    with _lock:  # mappings of segments whose owner died or unlinked them (a grown ring)
        stale = {
            n
            for n in _attached
            if not pid_alive(owner_of(n)) or not os.path.exists(os.path.join(SHM_DIR, n))
        }
    release(stale)
    return dead


def segments_of(pid: int) -> list[str]:
    """Names of the segments on this node that `pid` created (tests, diagnostics)."""
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(f"{PREFIX}{pid}-"))


@atexit.register
def _unlink_owned() -> None:
    for segment in list(_owned.values()):
        segment.unlink()
