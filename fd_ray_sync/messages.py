"""Typed messages that cross process boundaries. Dtypes are strings so they cross frameworks."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TensorMeta(_Message):
    """Name, shape and dtype of one tensor, plus where it sits in a bucket and its checksum."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int = Field(0, ge=0, description="Byte offset inside its bucket.")
    nbytes: int = Field(0, ge=0)
    crc32: int | None = Field(None, description="CRC-32 of the bytes, when checksums are on.")


class LoadReport(_Message):
    """One rank's account of one load (FastDeploy's update_weights_by_rdma return value)."""

    rank: int
    version: str | None
    source: str
    sync_s: float = Field(description="Seconds receiving/reading and checking the weights.")
    update_s: float = Field(description="Seconds writing them into the parameters.")
    total_s: float
    nbytes: int = Field(description="Bytes written into parameters.")
    params_updated: int
