"""Transports: how the bytes of an update reach a rank. One interface, a registry by name.

A transport has two halves. The trainer side (the `Fleet`) describes one update as a
`TransportSpec`: a small frozen value naming the version and where the bytes are (bucket
refs, a snapshot folder, shared-memory slots...), sent to every rank. The rank side is the
`WeightSource` registered under the spec's `transport` name: `open_source(spec, ctx)` finds
it and builds this rank's view, which the manager checks and writes. Nothing else branches
on a transport's name: a transport that needs no step leaves its hook as it is.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from fd_ray_sync.config import LoadConfig, ParallelConfig
from fd_ray_sync.errors import ConfigError
from fd_ray_sync.messages import TensorMeta
from fd_ray_sync.sharding import ShardSpec

Chunk = dict[str, tuple[np.ndarray, str]]
"""A group of this rank's tensors: name -> (array, dtype string), already cut to its slice.
The array is a numpy array, or a torch tensor on a device (ipc over CUDA), which the manager
writes device to device and reads to the host only to check it."""


def group_chunks(
    named: Iterable[tuple[str, np.ndarray, str]], chunk_bytes: int, what: str
) -> Iterator[tuple[str, Chunk]]:
    """(name, this rank's array, dtype) triples grouped into chunks of about `chunk_bytes`,
    each labelled with `what` and its last name (for a source whose tensors are all there)."""
    chunk: Chunk = {}
    used = 0
    for name, array, dtype in named:
        chunk[name] = (array, dtype)
        used += array.nbytes
        if used >= chunk_bytes:
            yield f"{what} up to {name}", chunk
            chunk, used = {}, 0
    if chunk:
        yield what, chunk


@dataclass(frozen=True)
class TransportSpec:
    """One update (or a committed version) as a transport describes it to every rank.

    Subclasses add where the bytes are and set `transport`, the registered name of the
    `WeightSource` that reads them on a rank. Small enough to send to every rank; a spec
    holding object refs keeps their data alive while anyone holds it.
    """

    transport: ClassVar[str] = ""
    streaming: ClassVar[bool] = False  # data arrives while ranks write (a feed runs)
    # Ranks check each block as the copy lands instead of reading the source twice, even
    # when the fleet could not roll back a mismatch (see `DynamicWeightManager.prepare_load`).
    check_while_copying: ClassVar[bool] = False
    # Ranks on nodes other than the trainer's re-put object-store buckets for the next node
    # (`fd_ray_sync.feed.relay_plan`); transports that move bytes their own way do not.
    relayed: ClassVar[bool] = False

    version: str | None
    # Only some of the model's parameters (`Fleet.update(..., partial=True)`): the others
    # keep their committed values. Such a spec is never a restore's source on its own: it
    # is not the whole model (see the coordinator's commit).
    partial: bool = field(default=False, kw_only=True)

    def with_version(self, version: str) -> TransportSpec:
        return dataclasses.replace(self, version=version)

    @property
    def restorable(self) -> bool:
        """Whether a rank can load this version again from the spec (rollback, rebuild)."""
        return False

    @property
    def nbytes(self) -> int:
        """Bytes of the whole update as the trainer sent it, where the spec knows (else 0)."""
        return 0

    @property
    def where(self) -> str:
        """Where the data is, for messages (" in /path"), or ""."""
        return ""

    def without_data(self) -> TransportSpec:
        """The version alone, data released (the store frees kept buckets)."""
        return VersionOnly(self.version)

    def received(self, feed: Any) -> TransportSpec:
        """After a streaming load: what the ranks received, as a spec that names it."""
        return self


@dataclass(frozen=True)
class VersionOnly(TransportSpec):
    """A committed version whose data nobody keeps: a replica that lost it waits for the
    next update."""

    transport: ClassVar[str] = "none"


@dataclass(frozen=True)
class RankContext:
    """What a rank tells a transport when it opens a source."""

    rank: int
    parallel: ParallelConfig
    load: LoadConfig
    plan: Mapping[str, ShardSpec]
    node: str | None = None


class WeightSource(ABC):
    """Delivers one rank's weights for one version.

    The manager asks for the `manifest()` first and checks every name, shape and dtype
    against the model before anything is written; then `verify()` (checksums, when on);
    then it writes `chunks()` one at a time, so extra memory stays about one chunk.

    A `streaming` source's data arrives while it is written (a pipelined transfer): only the
    manifest can be checked before the first write; the manager checks each chunk against
    `checksum(name)` (known once the chunk is delivered) before or after writing it.
    """

    name: str = ""
    streaming: bool = False
    # The data's checksums are not in the manifest: the trainer computes them while ranks
    # load, and the verify phase compares fingerprints (nothing to check before writing).
    deferred_checksums: bool = False

    @abstractmethod
    def manifest(self) -> dict[str, TensorMeta]:
        """Every tensor this source will deliver, by name (local shapes)."""

    @abstractmethod
    def chunks(self) -> Iterator[tuple[str, Chunk]]:
        """(label, chunk) pairs; the label names where the chunk came from (a file, a bucket)."""

    def verify(self) -> None:
        """Check the data against its checksums; raise ChecksumError naming the bad piece."""

    def checksum(self, name: str) -> int | None:
        """Checksum of `name`'s local bytes once its chunk was delivered (streaming sources)."""
        return None

    def version(self) -> str | None:
        """The version the source itself records (e.g. version.yaml), if any."""
        return None

    def close(self) -> None:
        """Release files, mappings or references."""

    def received(self, spec: TransportSpec) -> TransportSpec:
        """After a load of `spec`: the spec that names the data this rank now holds (what it
        would reload it from)."""
        return spec

    @classmethod
    def open(cls, spec: TransportSpec, ctx: RankContext) -> WeightSource:
        """This rank's view of `spec` (a spec of this transport)."""
        raise ConfigError(f"the {cls.name!r} source cannot be opened from a transport spec")


_REGISTRY: dict[str, type[WeightSource]] = {}


def register_source(name: str) -> Callable[[type[WeightSource]], type[WeightSource]]:
    """Class decorator: make a WeightSource subclass available under `name`."""

    def wrap(cls: type[WeightSource]) -> type[WeightSource]:
        if not (isinstance(cls, type) and issubclass(cls, WeightSource)):
            raise TypeError(f"{cls!r} is not a WeightSource subclass")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ConfigError(f"weight source {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def get_source(name: str) -> type[WeightSource]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown weight source {name!r}; known: {', '.join(sorted(_REGISTRY))}"
        ) from None


def known_sources() -> list[str]:
    return sorted(_REGISTRY)


def open_source(spec: TransportSpec, ctx: RankContext) -> WeightSource:
    """The registered source of `spec`'s transport, opened for this rank."""
    if isinstance(spec, VersionOnly):
        raise ConfigError(f"version {spec.version!r} was not kept: there is nothing to load")
    return get_source(spec.transport).open(spec, ctx)
