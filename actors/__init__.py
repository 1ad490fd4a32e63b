"""Ray actors: thin shells that call the fd_ray_sync core. They hold no weight logic."""

from actors.coordinator import CoordinatorActor
from actors.weight_manager import WeightManagerActor

__all__ = ["CoordinatorActor", "WeightManagerActor"]
