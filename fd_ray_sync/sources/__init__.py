"""Weight sources, registered by name. Importing this package registers the built-in ones."""

from fd_ray_sync.sources import snapshot  # noqa: F401  (registers "snapshot")
from fd_ray_sync.sources.base import (
    Chunk,
    WeightSource,
    get_source,
    known_sources,
    register_source,
)

__all__ = ["Chunk", "WeightSource", "get_source", "known_sources", "register_source"]
