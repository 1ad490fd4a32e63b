"""fd-ray-sync: move trained weights into a running Ray inference fleet, all-or-nothing."""

from fd_ray_sync.config import FleetConfig, LoadConfig, ParallelConfig
from fd_ray_sync.fleet import Fleet
from fd_ray_sync.manager import DynamicWeightManager
from fd_ray_sync.messages import GenerationResult, LoadReport, UpdateReport
from fd_ray_sync.status import KVCacheStatus, ModelWeightsStatus

__all__ = [
    "DynamicWeightManager",
    "Fleet",
    "FleetConfig",
    "GenerationResult",
    "KVCacheStatus",
    "LoadConfig",
    "LoadReport",
    "ModelWeightsStatus",
    "ParallelConfig",
    "UpdateReport",
]
