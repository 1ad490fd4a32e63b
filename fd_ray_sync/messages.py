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
    checksum: int | None = Field(
        None,
        description="Checksum of the bytes (`fd_ray_sync.checksum.digest`, blocked xxh3-64), "
        "when checksums are on.",
    )
    slice_checksums: tuple[int, ...] | None = Field(
        None,
        description="Checksum of each TP rank's slice (index = TP rank; one entry when every "
        "rank holds the whole tensor). Set by the trainer so a rank checks only its bytes.",
    )


class PrepareReport(_Message):
    """One rank's yes to an update: every check it could make before writing passed."""

    rank: int
    recorded_version: str | None = Field(
        description="The version the source itself records (a snapshot's version.yaml)."
    )
    sync_s: float = Field(description="Seconds the checks took.")


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


class UpdateReport(_Message):
    """What one fleet update did: the coordinator's answer to `Fleet.update`."""

    version: str
    nbytes: int = Field(description="Bytes the trainer put into the transfer (the full model).")
    phase_s: dict[str, float] = Field(description="Seconds of each transaction phase.")
    total_s: float
    ranks: tuple[LoadReport, ...]
    fingerprints: dict[int, str | None] = Field(
        description="Rank -> fingerprint of its weights (None with FleetConfig.fingerprint off)."
    )
    replicas_down: dict[int, str] = Field(
        default_factory=dict,
        description="Rolling updates: replicas that could not take the version after the "
        "first ones committed it (each rebuilt, and still down), and why.",
    )


class GenerationResult(_Message):
    """One prompt's completion and the weight version that produced it."""

    prompt: str
    text: str
    version: str
    replica: int
