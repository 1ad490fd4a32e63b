"""A synthetic model for transfer benchmarks: the sizes and shard plan of a real LM, no math.

About `n_tensors` tensors: two large matrices (embedding and head, replicated like ours),
per-layer matrices split over TP (column and row parallel, alternating), and many small
vectors (norms, biases). Sizes scale to `total_bytes`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import paddle

from fd_ray_sync.comm import CommGroups
from fd_ray_sync.config import ParallelConfig
from fd_ray_sync.engine.base import InferenceEngine
from fd_ray_sync.errors import StateError
from fd_ray_sync.sharding import REPLICATED, ShardSpec


def synthetic_shapes(total_bytes: int, n_tensors: int = 200) -> dict[str, tuple[int, ...]]:
    """Full shapes of a float32 model of about `total_bytes` (multiples of 64 on split axes)."""
    n_layers = max(1, (n_tensors - 2) // 8)
    # Per layer: 4 matrices [d, d] and 4 vectors [d]; plus embedding and head [v, d].
    # Solve 4*n*d^2 + 2*v*d ~= total/4 with v = 4d.
    d = int(np.sqrt(total_bytes / 4 / (4 * n_layers + 8)))
    d = max(64, d // 64 * 64)
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (4 * d, d)}
    for i in range(n_layers):
        for j, kind in enumerate(("qkv", "out", "up", "down")):
            shapes[f"layers.{i}.{kind}.weight"] = (d, d)
            shapes[f"layers.{i}.norm{j}.weight"] = (d,)
    shapes["lm_head.weight"] = (d, 4 * d)
    return shapes


def synthetic_plan(
    shapes: dict[str, tuple[int, ...]], tp: int, tp_rank: int
) -> dict[str, ShardSpec]:
    plan = {}
    for name, shape in shapes.items():
        if len(shape) == 2 and name.startswith("layers."):
            axis = 1 if name.split(".")[2] in ("qkv", "up") else 0  # column / row parallel
            plan[name] = ShardSpec(axis=axis, parts=tp, index=tp_rank) if tp > 1 else REPLICATED
        else:
            plan[name] = REPLICATED
    return plan


def synthetic_weights(
    shapes: dict[str, tuple[int, ...]], seed: int
) -> Iterator[tuple[str, np.ndarray]]:
    """Deterministic full weights, one tensor at a time (cheap to make: no RNG per element)."""
    for i, (name, shape) in enumerate(shapes.items()):
        yield name, np.full(shape, float(seed) + i * 1e-3, dtype=np.float32)


class _Params(paddle.nn.Layer):
    def __init__(self, local_shapes: dict[str, tuple[int, ...]], dtype: str):
        super().__init__()
        self._names = {}
        for i, (name, shape) in enumerate(local_shapes.items()):
            param = self.create_parameter(list(shape), dtype=dtype, is_bias=False)
            attr = f"p{i}"
            setattr(self, attr, param)
            self._names[attr] = name

    def state_dict(self, *args, **kwargs):
        # Expose the model's own parameter names, not the attribute names.
        return {self._names[k]: v for k, v in super().state_dict(*args, **kwargs).items()}


class SyntheticEngine(InferenceEngine):
    """Holds one rank's slices of a synthetic model; it has nothing to generate with."""

    def __init__(
        self,
        total_bytes: int,
        parallel: ParallelConfig,
        groups: CommGroups,
        dtype: str = "float32",
    ):
        self.parallel, self.groups = parallel, groups
        if not groups.up:
            groups.start()
        self._shapes = synthetic_shapes(total_bytes)
        self._plan = synthetic_plan(self._shapes, parallel.tp, parallel.tp_rank)
        local = {n: self._plan[n].local_shape(s) for n, s in self._shapes.items()}
        self.model = _Params(local, dtype)

    def models(self) -> list:
        return [self.model]

    def shard_plan(self) -> dict[str, ShardSpec]:
        return dict(self._plan)

    def full_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop=None) -> list[str]:
        raise StateError("the synthetic benchmark model has weights only; it cannot generate")
