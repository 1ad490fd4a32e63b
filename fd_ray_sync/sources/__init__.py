"""Weight sources, registered by name. Importing this package registers the built-in ones."""

from fd_ray_sync.sources import collective, ipc, object_store, peer, sharded, snapshot  # noqa: F401  (register themselves)
from fd_ray_sync.sources.base import (
    Chunk,
    RankContext,
    TransportSpec,
    VersionOnly,
    WeightSource,
    get_source,
    known_sources,
    open_source,
    register_source,
)

__all__ = [
    "Chunk",
    "RankContext",
    "TransportSpec",
    "VersionOnly",
    "WeightSource",
    "get_source",
    "known_sources",
    "open_source",
    "register_source",
]
