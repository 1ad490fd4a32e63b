"""Weight sources, registered by name. Importing this package registers the built-in ones."""

from fd_ray_sync.sources import object_store, snapshot  # noqa: F401  (register themselves)
from fd_ray_sync.sources.base import (
    Chunk,
    WeightSource,
    get_source,
    known_sources,
    register_source,
)

__all__ = ["Chunk", "WeightSource", "get_source", "known_sources", "register_source"]
