"""Configuration: one frozen pydantic model per component, validated where it is built."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MiB = 1 << 20

# FastDeploy's strategy names, accepted so its users can keep their configs.
_STRATEGY_ALIASES = {"ipc_snapshot": "snapshot", "rsync": "collective"}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LoadConfig(_Frozen):
    """Where a rank's weights come from and how they are checked."""

    load_strategy: str = Field(
        "snapshot",
        description="Name of a registered weight source (see fd_ray_sync.sources.known_sources()).",
    )
    model_dir: Path | None = Field(
        None, description="Folder of per-rank snapshot files and version.yaml."
    )
    fallback_dir: Path | None = Field(
        None,
        description="Shared folder tried last for a rank's snapshot "
        "(FastDeploy's /shared_ipc_meta).",
    )
    snapshot_id: int | None = Field(
        None,
        ge=0,
        description="The `{id}` in snapshot file names `model_state.tp{rank}.{id}.*`. "
        "None: each rank's TP rank, as a FastDeploy replica on GPUs 0..tp-1 writes them "
        "(its id is the rank's GPU id); a number: that id for every rank.",
    )
    bucket_bytes: int = Field(
        256 * MiB, gt=0, description="Bytes per transfer bucket (and per snapshot part file)."
    )
    verify_checksum: bool = Field(
        True,
        description="Check every tensor's checksum (blocked xxh3-64, taken while the bytes "
        "are copied where the update can roll back; snapshot files' own checksums otherwise).",
    )
    check_finite: bool = Field(False, description="Refuse weights holding NaN or Inf.")
    device_copies: Literal["torch", "batched"] = Field(
        "torch",
        description="How a rank copies device tensors out of a trainer's GPU memory (ipc over "
        "CUDA): one torch copy per tensor, or one batched-copy kernel per chunk "
        "(fd_ray_sync.cuda_copy: NVRTC and cuda-bindings; measured in the GPU check, not yet "
        "run in a fleet on a GPU).",
    )

    @field_validator("load_strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        from fd_ray_sync.sources import known_sources

        value = _STRATEGY_ALIASES.get(value, value)
        if value not in known_sources():
            raise ValueError(
                f"unknown load_strategy {value!r}; known: {', '.join(sorted(known_sources()))}"
            )
        return value


class ParallelConfig(_Frozen):
    """A fleet's layout: `world = dp * tp` ranks; ranks [r*tp, (r+1)*tp) are replica r.

    With expert parallelism on, each replica's experts are split over its own ranks (the EP
    group has the same members as the TP group; see DESIGN.md for why not the whole world).
    """

    tp: int = Field(1, ge=1, description="Tensor-parallel size (ranks per replica).")
    dp: int = Field(1, ge=1, description="Data-parallel size (number of replicas).")
    enable_expert_parallel: bool = Field(False, description="Split MoE experts over EP ranks.")
    rank: int = Field(0, ge=0, description="This process's global rank.")
    backend: Literal["gloo", "nccl"] = Field("gloo", description="Collective backend.")
    collective_timeout_s: float = Field(
        1800.0, gt=0, description="Timeout of every TP/EP collective (gloo and NCCL groups)."
    )
    shutdown_comm_groups_on_clear: bool = Field(
        False,
        description="Tear TP/EP groups down on clear and rebuild them on the next load "
        "(FastDeploy's --shutdown-comm-group-if-worker-idle).",
    )

    @model_validator(mode="after")
    def _rank_in_world(self) -> ParallelConfig:
        if self.rank >= self.world_size:
            raise ValueError(
                f"rank {self.rank} is outside the world of {self.world_size} ranks "
                f"(dp={self.dp} x tp={self.tp})"
            )
        return self

    @property
    def world_size(self) -> int:
        return self.dp * self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def ep_size(self) -> int:
        return self.tp if self.enable_expert_parallel else 1

    @property
    def ep_rank(self) -> int:
        return self.tp_rank if self.enable_expert_parallel else 0

    def replica_ranks(self, replica: int) -> list[int]:
        """Global ranks of one replica's TP (and EP) group."""
        return list(range(replica * self.tp, (replica + 1) * self.tp))

    def for_rank(self, rank: int) -> ParallelConfig:
        """The same layout seen from another rank."""
        return ParallelConfig(**{**self.model_dump(), "rank": rank})


FEED_THREADS = 64
"""Coordinator threads serving the feed of a pipelined update: each rank waits in one for
its next bucket, so bigger fleets (more than FEED_THREADS - 4 ranks) gather updates instead."""


class FleetConfig(_Frozen):
    """A Ray fleet of `dp` replicas x `tp` ranks and how its coordinator runs updates."""

    name: str = Field("fd-ray-sync", min_length=1, description="Name of the coordinator actor.")
    namespace: str = Field("fd_ray_sync", min_length=1, description="Ray namespace of the fleet.")
    tp: int = Field(2, ge=1, description="Tensor-parallel ranks per replica.")
    dp: int = Field(1, ge=1, description="Replicas.")
    enable_expert_parallel: bool = Field(True, description="Split MoE experts over each replica.")
    model: str = Field("tiny", description="Reference-engine model preset (default factory only).")
    load: LoadConfig = Field(
        default_factory=lambda: LoadConfig(load_strategy="object_store"),
        description="Checks applied to every load; model_dir set means bootstrap from a snapshot.",
    )
    phase_timeout_s: float = Field(120.0, gt=0, description="Barrier timeout of each phase.")
    clear_before_load: bool = Field(
        False, description="Free weights (and KV cache) before loading, to make room (in-place)."
    )
    fingerprint: bool = Field(
        True,
        description="Each rank digests its weights in the verify phase (xxh3-64 of every "
        "byte: ~14 GB/s a core, reused from the load's checksums when it took them); off, "
        "verify only checks every parameter is loaded.",
    )
    keep_committed: bool = Field(
        True,
        description="Keep a copy of the committed version in the object store (one model's "
        "size) so an aborted update rolls back even when no replica was left untouched: the "
        "trainer's buckets (object store), or for ipc and collective updates a copy replica "
        "0's ranks make in their node's store after the commit. Off, such a replica stays "
        "down until the next update unless another replica serves the version (restores "
        "read from a serving replica first). Snapshot sources are always kept.",
    )
    pipelined: bool = Field(
        True,
        description="Updates from a mapping: ranks write each bucket while the trainer puts "
        "the next ones. Off: every bucket is put first, then loaded (as for an iterator); "
        "on a host with few cores, where puts and rank writes compete, that can be faster "
        "(docs/benchmarks.md).",
    )
    buckets_in_flight: int = Field(
        2,
        ge=2,
        description="Pipelined updates: buckets put and not yet written by every rank, at "
        "most (backpressure; bounds the update's object-store use when keep_committed is "
        "off). At least 2: a rank reports bucket i written when it asks for bucket i+2. "
        "A relay chain of n nodes adds n - 1, so that every hop moves a bucket at once.",
    )
    relay: bool = Field(
        True,
        description="Pipelined updates to ranks on several nodes other than the trainer's: "
        "the first such node fetches each bucket from the trainer's node and re-puts it, "
        "each next node fetches from the one before (a chain), so about one model's bytes "
        "leave the trainer's node instead of one per node.",
    )
    shutdown_comm_groups_on_clear: bool = Field(
        False,
        description="Tear every rank's TP/EP groups down on clear and bring them back with "
        "the next update (FastDeploy's --shutdown-comm-group-if-worker-idle).",
    )
    detached: bool = Field(
        False,
        description="Keep the fleet (coordinator, ranks, placement group) alive after the "
        "driver exits; off, all of it goes with the driver's job.",
    )
    use_gpu: bool | None = Field(None, description="GPU bundles; None: when the cluster has GPUs.")
    gpus_per_rank: float = Field(
        1.0,
        gt=0,
        le=1,
        description="GPU fleets: the share of its bundle's GPU (one per bundle) a rank takes. "
        "Below 1 leaves the rest to a trainer actor placed in the same bundle "
        "(Fleet.placement_groups()): trainer and rank then share that GPU.",
    )
    gpu_visibility: Literal["own", "node"] = Field(
        "own",
        description="GPU fleets: own: each rank sees only its GPU (Ray's default). node: each "
        "rank sees every GPU of its node, its own as device 0 (fd_ray_sync.gpus), so it can "
        "map a trainer's memory on another GPU: the ipc transport with one trainer process "
        "feeding ranks on several GPUs.",
    )
    pause_mode: Literal["abort", "wait", "keep"] = Field(
        "wait",
        description="What an update's pause does to the requests a replica is serving: "
        "abort answers them at once as aborted; wait lets them finish on the weights they "
        "started on; keep runs them again from the start after the update, on the new "
        "weights (actors/front.py).",
    )
    update_mode: Literal["all", "rolling"] = Field(
        "all",
        description="all: every replica pauses and loads the update in one all-or-nothing "
        "transaction. rolling: the first `rolling_replicas` replicas run the transaction "
        "while the others serve; then the others follow, that many at a time, each loading "
        "the committed version from a replica that serves it (all-or-nothing per replica).",
    )
    rolling_replicas: int = Field(
        1, ge=1, description="Rolling updates: replicas updated at a time."
    )
    max_batch: int = Field(
        32, ge=1, description="Prompts a replica's front puts in one engine call, at most."
    )

    def parallel(self, rank: int = 0) -> ParallelConfig:
        return ParallelConfig(
            tp=self.tp,
            dp=self.dp,
            enable_expert_parallel=self.enable_expert_parallel,
            rank=rank,
            backend="nccl" if self.use_gpu else "gloo",
            # A hung collective must surface before the coordinator's barrier gives up on it.
            collective_timeout_s=self.phase_timeout_s,
            shutdown_comm_groups_on_clear=self.shutdown_comm_groups_on_clear,
        )
