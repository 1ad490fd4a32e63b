"""Published update times and the setups we assumed for them, to run through the same model."""

from __future__ import annotations

from pydantic import Field

from fd_ray_sync.scale.model import FrozenModel, PlanInputs


class Published(FrozenModel):
    """A published update time and its setup, as our model reads it."""

    name: str
    seconds: float
    source: str
    inputs: PlanInputs
    assumed: str = Field(description="What the publication does not say and we assumed.")


GiB = 1 << 30
PUBLISHED = (
    Published(
        name="checkpoint-engine: Qwen3-235B-A22B BF16 -> 8xH800 TP8", seconds=6.22,
        source="github.com/MoonshotAI/checkpoint-engine README, Benchmark, Update (Broadcast)",
        inputs=PlanInputs(params=235e9, bytes_per_param=2, gpus=8, tp=8, link_gbit=400,
                          intra_gbyte=200, bucket_bytes=int(2.67 * GiB), colocated=True,
                          source="host"),
        assumed="H800 NVLink 400 GB/s both ways -> 200 GB/s into a GPU; weights in host memory "
        "of the same node, sharded over its 8 GPUs (their layout); bucket 2.67 GiB (theirs)",
    ),
    Published(
        name="checkpoint-engine: Kimi-K2 1T FP8 -> 256xH20 TP16", seconds=16.04,
        source="github.com/MoonshotAI/checkpoint-engine README, Benchmark, Update (Broadcast)",
        inputs=PlanInputs(params=1e12, bytes_per_param=1, gpus=256, tp=16, link_gbit=400,
                          intra_gbyte=450, bucket_bytes=8 * GiB, colocated=True, source="host"),
        assumed="network not published: 8 x 400 Gbit/s NICs a node; H20 NVLink 900 GB/s both "
        "ways -> 450 GB/s into a GPU; 1e12 params x 1 B; bucket 8 GiB (theirs)",
    ),
    Published(
        name="verl: Qwen3-30B-A3B BF16 -> 30 rollouts, 4x8 H100", seconds=7.0,
        source="github.com/volcengine/verl verl/checkpoint_engine/README.md, Benchmark "
        "(~7 s, 8.25 GB/s)",
        inputs=PlanInputs(params=30.5e9, bytes_per_param=2, gpus=30, tp=1, link_gbit=400,
                          intra_gbyte=450, trainer_gpus=2),
        assumed="ConnectX-7 400 Gbit/s, one a GPU; H100 NVLink 450 GB/s into a GPU; the 2 FSDP "
        "trainer GPUs on a node of their own; our 1 GiB buckets",
    ),
)  # fmt: skip
