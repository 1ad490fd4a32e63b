"""Layout operations of a mapping rule (`fd_ray_sync.mapping.rules`): `Reshape`,
`Transpose` and `Cast`, each with the shape it makes (checked on names and shapes only) and
the array it makes. Arrays are (storage array, dtype string) pairs: a bfloat16 tensor is its
uint16 bits, which reshape and transpose like any other; `cast` converts between storages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fd_ray_sync.tensors import storage_dtype

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class Reshape(BaseModel):
    """numpy reshape; one entry may be -1."""

    model_config = _FROZEN
    op: Literal["reshape"] = "reshape"
    shape: tuple[int, ...]

    def shape_of(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        size, known = math.prod(shape), [d for d in self.shape if d != -1]
        if self.shape.count(-1) > 1 or any(d < -1 for d in self.shape):
            raise ValueError(f"bad reshape {self.shape}")
        if self.shape.count(-1) == 1:
            if not math.prod(known) or size % math.prod(known):
                raise ValueError(f"cannot reshape {shape} to {self.shape}")
            return tuple(size // math.prod(known) if d == -1 else d for d in self.shape)
        if math.prod(self.shape) != size:
            raise ValueError(f"cannot reshape {shape} to {self.shape}")
        return self.shape

    def run(self, array: np.ndarray, dtype: str) -> tuple[np.ndarray, str]:
        return array.reshape(self.shape), dtype


class Transpose(BaseModel):
    """numpy transpose by `axes` (a view; copied when packed)."""

    model_config = _FROZEN
    op: Literal["transpose"] = "transpose"
    axes: tuple[int, ...]

    def shape_of(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if sorted(self.axes) != list(range(len(shape))):
            raise ValueError(f"axes {self.axes} do not permute a {len(shape)}-d shape {shape}")
        return tuple(shape[a] for a in self.axes)

    def run(self, array: np.ndarray, dtype: str) -> tuple[np.ndarray, str]:
        return array.transpose(self.axes), dtype


class Cast(BaseModel):
    """Convert to `dtype` (a dtype string of `fd_ray_sync.tensors`; bfloat16 rounds to
    nearest even)."""

    model_config = _FROZEN
    op: Literal["cast"] = "cast"
    dtype: str

    @field_validator("dtype")
    @classmethod
    def _known(cls, dtype: str) -> str:
        storage_dtype(dtype)
        return dtype

    def run(self, array: np.ndarray, dtype: str) -> tuple[np.ndarray, str]:
        return cast(array, dtype, self.dtype), self.dtype


Op = Annotated[Reshape | Transpose | Cast, Field(discriminator="op")]


def cast(array: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Storage array of dtype `src` -> storage array of dtype `dst`."""
    if src == dst:
        return array
    if src == "bfloat16":
        array = (array.astype(np.uint32) << 16).view(np.float32)
        return array if dst == "float32" else array.astype(storage_dtype(dst))
    if dst == "bfloat16":
        bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
        out = rounded.astype(np.uint16)
        nan = np.isnan(bits.view(np.float32))
        if nan.any():
            out[nan] = 0x7FC0  # rounding could carry a NaN's payload into infinity
        return out
    return array.astype(storage_dtype(dst))


def run_ops(ops: Sequence[Op], array: np.ndarray, dtype: str) -> tuple[np.ndarray, str]:
    for op in ops:
        array, dtype = op.run(array, dtype)
    return array, dtype


def ops_shape(ops: Sequence[Op], shape: tuple[int, ...], dtype: str) -> tuple[tuple, str]:
    for op in ops:
        if isinstance(op, Cast):
            dtype = op.dtype
        else:
            shape = op.shape_of(shape)
    return shape, dtype
