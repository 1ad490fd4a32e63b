"""The interface every weight source honours, and the registry that finds them by name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import numpy as np

from fd_ray_sync.errors import ConfigError
from fd_ray_sync.messages import TensorMeta

Chunk = dict[str, tuple[np.ndarray, str]]
"""A group of this rank's tensors: name -> (array, dtype string), already cut to its slice."""


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
