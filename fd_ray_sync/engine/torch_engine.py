"""A torch inference engine: a user's `torch.nn.Module` served and updated by the fleet.

    fleet = Fleet.launch(FleetConfig(tp=1, dp=2), engine_factory=torch_lm_engine)
    fleet.update(trainer_module.state_dict(), version=step)

The weight manager captures the module's `state_dict(keep_vars=True)` (parameters and
persistent buffers, by their state-dict names) and writes them in place. A user's engine
for its own module is a factory of the same shape, made picklable with functools.partial:

    def my_engine(parallel, groups, path):
        return TorchEngine(lambda: load_my_module(path), parallel, groups, plan_for(parallel))

    Fleet.launch(config, engine_factory=functools.partial(my_engine, path="/models/x"))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from fd_ray_sync.comm import CommGroups
from fd_ray_sync.config import ParallelConfig
from fd_ray_sync.engine import tokenizer
from fd_ray_sync.engine.base import InferenceEngine
from fd_ray_sync.engine.spec import TINY_DENSE, ModelConfig, shard_plan
from fd_ray_sync.engine.torch_model import TorchDecoderLM
from fd_ray_sync.errors import ConfigError, StateError
from fd_ray_sync.log import get_logger
from fd_ray_sync.params import model_parameters, param_shape
from fd_ray_sync.sharding import REPLICATED, ShardSpec
from fd_ray_sync.status import KVCacheStatus


class TorchEngine(InferenceEngine):
    """One rank serving a torch module.

    `module` is the module or a zero-argument factory building it (built here, on the
    rank). `plan` maps state-dict names to the slice of the full tensor this rank holds;
    names it leaves out are replicated. Generation is greedy through the byte tokenizer:
    the module's own `generate_ids(prompt_ids, max_new_tokens)` when it has one, else a
    loop over `module(ids)` returning logits [batch, t, vocab]. `free_kv_cache` /
    `alloc_kv_cache` call the module's methods of those names when it has them.
    """

    def __init__(
        self,
        module: torch.nn.Module | Callable[[], torch.nn.Module],
        parallel: ParallelConfig | None = None,
        groups: CommGroups | None = None,
        plan: Mapping[str, ShardSpec] | None = None,
    ):
        self._join_groups(parallel, groups)
        self._log = get_logger(__name__, self.parallel.rank)
        self.module = module if isinstance(module, torch.nn.Module) else module()
        if not isinstance(self.module, torch.nn.Module):
            raise ConfigError(f"the module factory returned a {type(self.module).__name__}")
        self.module.eval()
        tensors = model_parameters(self.module)
        unknown = sorted(set(plan or {}) - set(tensors))
        if unknown:
            raise ConfigError(f"the shard plan names tensors the module lacks: {unknown[:5]}")
        self._plan = {name: (plan or {}).get(name, REPLICATED) for name in tensors}
        self._full = {n: _full_shape(n, param_shape(t), self._plan[n]) for n, t in tensors.items()}
        self._device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
        self._kv = KVCacheStatus.NORMAL
        self._log.info(
            "torch engine built: tp=%d, %d tensors on %s",
            self.parallel.tp,
            len(tensors),
            self._device,
        )

    # --- InferenceEngine -------------------------------------------------------------------

    def models(self) -> list[torch.nn.Module]:
        return [self.module]

    def shard_plan(self) -> dict[str, ShardSpec]:
        return dict(self._plan)

    def full_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._full)

    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop=None) -> list[str]:
        """Runs every prompt to the end: `stop` is not honoured (see InferenceEngine)."""
        if self._kv != KVCacheStatus.NORMAL:
            raise StateError("the KV cache is freed; call alloc_kv_cache() before generating")
        return [
            tokenizer.decode(self.generate_ids(tokenizer.encode(p), max_new_tokens))
            for p in prompts
        ]

    @property
    def kv_cache_status(self) -> KVCacheStatus:
        return self._kv

    def free_kv_cache(self) -> None:
        if hasattr(self.module, "free_kv_cache"):
            self.module.free_kv_cache()
        self._kv = KVCacheStatus.CLEARED

    def alloc_kv_cache(self) -> None:
        if hasattr(self.module, "alloc_kv_cache"):
            self.module.alloc_kv_cache()
        self._kv = KVCacheStatus.NORMAL

    # --- generation ------------------------------------------------------------------------

    @torch.no_grad()
    def generate_ids(self, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of one prompt's token ids (no stop token: every TP rank runs
        the same number of steps, so their collectives stay matched)."""
        if hasattr(self.module, "generate_ids"):
            return list(self.module.generate_ids(prompt, max_new_tokens))
        seq, new = list(prompt) or [0], []
        for _ in range(max_new_tokens):
            out = self.module(torch.tensor([seq], dtype=torch.int64, device=self._device))
            logits = getattr(out, "logits", out)  # plain logits, or a HF-style output
            new.append(int(torch.argmax(logits[0, -1])))
            seq.append(new[-1])
        return new


def _full_shape(name: str, local: tuple[int, ...], spec: ShardSpec) -> tuple[int, ...]:
    """The full tensor's shape, from this rank's slice of it."""
    if spec.is_replicated:
        return local
    if spec.axis >= len(local):
        raise ConfigError(f"shard plan of {name!r}: axis {spec.axis} of a {len(local)}-d tensor")
    full = list(local)
    full[spec.axis] *= spec.parts
    return tuple(full)


def torch_lm_engine(
    parallel: ParallelConfig,
    groups: CommGroups,
    config: ModelConfig = TINY_DENSE,
    seed: int | None = None,
    device: str = "cpu",
) -> TorchEngine:
    """Engine factory for `Fleet.launch`: the torch reference LM (`TorchDecoderLM`) sharded
    over TP like the paddle one. `functools.partial(torch_lm_engine, config=...)` picks
    another dense config; `seed` fills the weights from `init_full_state_dict(config, seed)`
    (the paddle reference engine's numbers) instead of torch's random init; `device` is where
    the module lives ("cuda" in a GPU fleet: a rank actor sees its own GPU as cuda:0)."""
    model = TorchDecoderLM(config, parallel, groups).to(device)
    plan = shard_plan(config, parallel)
    if seed is not None:
        from fd_ray_sync.engine.reference import iter_full_state_dict
        from fd_ray_sync.params import write_param
        from fd_ray_sync.sharding import take_shard

        tensors = model_parameters(model)
        for name, full in iter_full_state_dict(config, seed):
            write_param(tensors[name], take_shard(full, plan[name]), "float32")
    return TorchEngine(model, parallel, groups, plan)
