"""Shard plans: which slice of each full parameter a rank holds. Pure functions, numpy only.

A rank's parameter `name` is `full[name][spec.slices(full_shape)]`: the full tensor cut into
`parts` equal chunks along `axis`, chunk `index` kept. `axis=None` means the rank holds the
whole tensor (replicated). Column-parallel linears split their output axis over TP, row-parallel
ones their input axis, and stacked MoE experts split axis 0 over EP.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fd_ray_sync.errors import WeightMismatchError
from fd_ray_sync.tensors import contiguous


class ShardSpec(BaseModel):
    """The slice of one full parameter held by one rank."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    axis: int | None = Field(None, ge=0, description="Axis split across ranks; None: replicated.")
    parts: int = Field(1, ge=1, description="Number of equal chunks along `axis`.")
    index: int = Field(0, ge=0, description="Which chunk this rank holds.")

    @model_validator(mode="after")
    def _index_in_range(self) -> ShardSpec:
        if self.index >= self.parts:
            raise ValueError(f"shard index {self.index} >= parts {self.parts}")
        if self.axis is None and self.parts != 1:
            raise ValueError("a replicated shard (axis=None) has exactly one part")
        return self

    @property
    def is_replicated(self) -> bool:
        return self.axis is None or self.parts == 1

    def bounds(self, full_shape: Sequence[int]) -> tuple[int, int]:
        """[start, stop) along `axis` (the whole axis 0 range when replicated)."""
        if self.is_replicated:
            return 0, (full_shape[0] if full_shape else 1)
        size = full_shape[self.axis]
        if size % self.parts:
            raise WeightMismatchError(
                f"axis {self.axis} of shape {tuple(full_shape)} ({size}) does not split "
                f"into {self.parts} equal parts"
            )
        step = size // self.parts
        return self.index * step, (self.index + 1) * step

    def slices(self, full_shape: Sequence[int]) -> tuple[slice, ...]:
        if self.is_replicated:
            return tuple(slice(None) for _ in full_shape)
        start, stop = self.bounds(full_shape)
        return tuple(
            slice(start, stop) if ax == self.axis else slice(None) for ax in range(len(full_shape))
        )

    def local_shape(self, full_shape: Sequence[int]) -> tuple[int, ...]:
        if self.is_replicated:
            return tuple(full_shape)
        start, stop = self.bounds(full_shape)
        shape = list(full_shape)
        shape[self.axis] = stop - start
        return tuple(shape)


REPLICATED = ShardSpec()


def local_shape_of(name: str, spec: ShardSpec, full_shape: Sequence[int]) -> tuple[int, ...]:
    """`spec.local_shape(full_shape)`, its error naming the parameter `name`."""
    try:
        return spec.local_shape(full_shape)
    except WeightMismatchError as e:
        raise WeightMismatchError(f"parameter {name!r}: {e}") from None


ShardPlan = Mapping[str, ShardSpec]
"""Parameter name -> the slice this rank holds. Names missing from a plan are replicated."""


def take_shard(full: np.ndarray, spec: ShardSpec) -> np.ndarray:
    """This rank's slice of a full array (a view, no copy; the array itself when whole)."""
    if spec.is_replicated:
        return full
    if spec.axis is not None and spec.axis >= full.ndim:
        raise WeightMismatchError(f"shard axis {spec.axis} out of range for shape {full.shape}")
    return full[spec.slices(full.shape)]


def shard_state_dict(full: Mapping[str, np.ndarray], plan: ShardPlan) -> dict[str, np.ndarray]:
    """Every tensor of `full` cut to this rank's slice (contiguous copies)."""
    return {
        name: contiguous(take_shard(arr, plan.get(name, REPLICATED))) for name, arr in full.items()
    }
