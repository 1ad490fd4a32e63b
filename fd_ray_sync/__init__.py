"""fd-ray-sync: move trained weights into a running Ray inference fleet, all-or-nothing.

The names below are imported on first use, so a submodule that needs neither Ray nor paddle
(`python -m fd_ray_sync.gpucheck` on a bare GPU machine) imports without them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DynamicWeightManager": "fd_ray_sync.manager",
    "Fleet": "fd_ray_sync.fleet",
    "FleetConfig": "fd_ray_sync.config",
    "GenerationResult": "fd_ray_sync.messages",
    "KVCacheStatus": "fd_ray_sync.status",
    "LoadConfig": "fd_ray_sync.config",
    "LoadReport": "fd_ray_sync.messages",
    "ModelWeightsStatus": "fd_ray_sync.status",
    "ParallelConfig": "fd_ray_sync.config",
    "UpdateReport": "fd_ray_sync.messages",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # noqa: SIM108 - for type checkers and IDEs only
    from fd_ray_sync.config import FleetConfig, LoadConfig, ParallelConfig  # noqa: F401
    from fd_ray_sync.fleet import Fleet  # noqa: F401
    from fd_ray_sync.manager import DynamicWeightManager  # noqa: F401
    from fd_ray_sync.messages import GenerationResult, LoadReport, UpdateReport  # noqa: F401
    from fd_ray_sync.status import KVCacheStatus, ModelWeightsStatus  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fd_ray_sync' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
