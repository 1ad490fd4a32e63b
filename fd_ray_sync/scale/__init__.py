"""`fd-ray-sync plan`: one update's time at scale, on paper, from a small explicit cost model.

- `model`: the setup (`PlanInputs`), the transports' shapes, the constants (`ASSUMED`),
  `estimate` and its bandwidth floor;
- `measured`: loading shaped-network bench files and fitting the constants to them;
- `published`: published update times and the setups assumed for them;
- `report`: the tables `plan` prints; `command`: its arguments and run.

docs/scale.md derives the terms and names every assumption.
"""

from fd_ray_sync.scale.command import add_arguments, run_from_args
from fd_ray_sync.scale.measured import (
    CONSTANT_NAMES,
    DEFAULT_MEASURED,
    HOST_COPY_GBYTE,
    METHOD_TRANSPORTS,
    MeasuredRun,
    find_measured,
    fit,
    load_measured,
)
from fd_ray_sync.scale.model import (
    ASSUMED,
    DTYPE_BYTES,
    GB,
    RAY_CHUNK,
    TERMS,
    TRANSPORTS,
    Constants,
    Estimate,
    MiB,
    PlanInputs,
    TransportModel,
    estimate,
    floor_s,
)
from fd_ray_sync.scale.published import PUBLISHED, GiB, Published
from fd_ray_sync.scale.report import TERM_ABOUT, variants

__all__ = [
    "ASSUMED",
    "CONSTANT_NAMES",
    "DEFAULT_MEASURED",
    "DTYPE_BYTES",
    "GB",
    "GiB",
    "HOST_COPY_GBYTE",
    "METHOD_TRANSPORTS",
    "MiB",
    "PUBLISHED",
    "RAY_CHUNK",
    "TERMS",
    "TERM_ABOUT",
    "TRANSPORTS",
    "Constants",
    "Estimate",
    "MeasuredRun",
    "PlanInputs",
    "Published",
    "TransportModel",
    "add_arguments",
    "estimate",
    "find_measured",
    "fit",
    "floor_s",
    "load_measured",
    "run_from_args",
    "variants",
]
