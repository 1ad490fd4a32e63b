"""The reference engine: one rank's shard of `DecoderLM` behind the `InferenceEngine` interface.

It is what the demo, the tests and the benchmarks serve. Requests run to completion inside
`generate()`, one prompt at a time, so there is no queue to drain.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import paddle

from fd_ray_sync import fp8
from fd_ray_sync.comm import CommGroups
from fd_ray_sync.config import ParallelConfig
from fd_ray_sync.engine import tokenizer
from fd_ray_sync.engine.base import InferenceEngine
from fd_ray_sync.engine.model import DecoderLM, assign_parameters, set_parameter
from fd_ray_sync.engine.spec import ModelConfig, full_shapes, quantized_names, shard_plan
from fd_ray_sync.errors import WeightMismatchError
from fd_ray_sync.log import get_logger
from fd_ray_sync.sharding import ShardSpec, shard_state_dict, take_shard
from fd_ray_sync.status import KVCacheStatus
from fd_ray_sync.tensors import tagged


def iter_full_state_dict(config: ModelConfig, seed: int) -> Iterator[tuple[str, np.ndarray]]:
    """Deterministic full weights, one parameter at a time (float32 numpy).

    Scales keep activations near unit size, so logits are well separated and greedy choices
    do not flip on rounding differences between a sharded and a full model. Biases and
    norm weights are random too, so a bias added twice or a skipped norm shows in tests.

    For an FP8 `weight_dtype`, the same float32 weights with each of `quantized_names`
    quantized (`fp8.quantize`): its bits tagged with the dtype, then its `_scale`.
    """
    fp8_names = quantized_names(config)
    for name, array in _iter_float_state_dict(config, seed):
        if name in fp8_names:
            bits, scale = fp8.quantize(array, config.weight_dtype)
            yield name, tagged(bits, config.weight_dtype)
            yield f"{name}_scale", scale
        else:
            yield name, array


def _iter_float_state_dict(config: ModelConfig, seed: int) -> Iterator[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    float_config = config.model_copy(update={"weight_dtype": "float32"})
    for name, shape in full_shapes(float_config).items():
        noise = rng.standard_normal(shape, dtype=np.float32)
        if not shape:  # the logit scale: positive, near 1
            yield name, np.asarray(1.0 + 0.1 * noise, dtype=np.float32)
        elif name.endswith(".lora_B"):  # fresh adapters: the base model, unchanged
            yield name, np.zeros(shape, np.float32)
        elif name.endswith("embed.weight"):
            yield name, noise
        elif len(shape) == 1:
            owner = name.rsplit(".", 2)[-2]  # "ln1" in "layers.0.ln1.weight"
            is_norm_weight = owner.startswith("ln") and name.endswith(".weight")
            yield name, (1.0 + 0.1 * noise) if is_norm_weight else 0.1 * noise
        else:
            # [.., in, out]: scale by fan-in, as for a Linear.
            yield name, noise / np.float32(np.sqrt(shape[-2]))


def init_full_state_dict(config: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """The whole of `iter_full_state_dict` in one dict."""
    return dict(iter_full_state_dict(config, seed))


class ReferenceEngine(InferenceEngine):
    """One rank of a replica serving the reference LM with real TP (and EP) collectives."""

    def __init__(
        self,
        config: ModelConfig,
        parallel: ParallelConfig | None = None,
        groups: CommGroups | None = None,
        seed: int | None = None,
    ):
        self.config = config
        self._join_groups(parallel, groups)
        self._log = get_logger(__name__, self.parallel.rank)
        self.model = DecoderLM(config, self.parallel, self.groups)
        self.model.eval()
        self._ep_buffer: paddle.Tensor | None = None
        self.recreate_ep_buffer()
        if seed is not None:
            self.seed_weights(seed)
        self._log.info(
            "reference engine built: tp=%d ep=%d, %d local parameters",
            self.parallel.tp,
            self.parallel.ep_size,
            len(self.model.parameters()),
        )

    # --- InferenceEngine -------------------------------------------------------------------

    def models(self) -> list[DecoderLM]:
        return [self.model]

    def shard_plan(self) -> dict[str, ShardSpec]:
        return shard_plan(self.config, self.parallel)

    def full_shapes(self) -> dict[str, tuple[int, ...]]:
        return full_shapes(self.config)

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int,
        stop: Callable[[], bool] | None = None,
    ) -> list[str]:
        """Greedy decoding, one prompt at a time; a prompt repeated in the batch is
        decoded once (same weights, same prompt: the same text). `stop`: the replica's
        ranks end early together once any is asked to (see DecoderLM.generate_ids)."""
        texts = {}
        for p in dict.fromkeys(prompts):
            ids = self.model.generate_ids(tokenizer.encode(p), max_new_tokens, stop)
            texts[p] = tokenizer.decode(ids)
        return [texts[p] for p in prompts]

    @property
    def kv_cache_status(self) -> KVCacheStatus:
        return self.model.kv_cache.status

    def clear_requests(self) -> None:
        """Nothing to drop: requests finish inside generate() and no prefix cache is kept."""

    def free_kv_cache(self) -> None:
        self.model.kv_cache.free()
        self._log.debug("KV cache freed")

    def alloc_kv_cache(self) -> None:
        self.model.kv_cache.alloc()
        self._log.debug("KV cache allocated")

    @property
    def ep_buffer_allocated(self) -> bool:
        return self._ep_buffer is not None

    def clear_ep_buffer(self) -> None:
        self._ep_buffer = None

    def recreate_ep_buffer(self) -> None:
        # Stands in for DeepEP's dispatch buffer: room for every token's top-k expert inputs.
        if self.parallel.enable_expert_parallel and self._ep_buffer is None:
            c = self.config
            self._ep_buffer = paddle.zeros([c.max_seq_len * c.top_k, c.d_model], c.dtype)

    # --- weights and inspection for tests and demos ----------------------------------------

    def seed_weights(self, seed: int) -> None:
        """Fill this rank's parameters with its slice of `init_full_state_dict(config, seed)`.

        Slices one full tensor at a time, so a rank never holds the whole full model.
        """
        plan, params = self.shard_plan(), dict(self.model.named_parameters())
        for name, full in iter_full_state_dict(self.config, seed):
            set_parameter(name, params[name], take_shard(full, plan[name]))

    def load_full_state_dict(self, full: Mapping[str, np.ndarray]) -> None:
        """Cut a full state dict to this rank's slices and copy them into the parameters."""
        expected = self.full_shapes()
        for name, array in full.items():
            if name in expected and tuple(array.shape) != expected[name]:
                raise WeightMismatchError(
                    f"rank {self.parallel.rank}: parameter {name} has full shape "
                    f"{tuple(array.shape)}, expected {expected[name]}"
                )
        assign_parameters(self.model, shard_state_dict(full, self.shard_plan()))

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits [len(token_ids), vocab] of one sequence (full causal pass, no KV cache)."""
        with paddle.no_grad():
            out = self.model(paddle.to_tensor([list(token_ids)], dtype="int64"))
        return out[0].numpy()
