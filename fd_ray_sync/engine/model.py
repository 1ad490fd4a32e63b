"""The reference engine's model: a small decoder-only LM with real tensor and expert parallelism.

One class serves as the trainer's full model (one process, no groups, autograd works) and as
one rank's shard of it: parameter names are the same in both, only shapes differ, and
`shard_plan` (fd_ray_sync.engine.spec) says which slice of each full parameter a rank
holds. Layouts (paddle Linear weights are [in_features, out_features]):

    embed.weight, pos_embed.weight                      replicated
    layers.{i}.ln1.*, ln2.*                             replicated
    layers.{i}.attn.qkv.weight [d, 3d], .bias [3d]      column-parallel (heads split over TP)
    layers.{i}.attn.out.weight [d, d]                   row-parallel; .bias [d] replicated
    layers.{i}.mlp.up.weight [d, ff], .bias [ff]        column-parallel   (dense layers)
    layers.{i}.mlp.down.weight [ff, d]                  row-parallel; .bias [d] replicated
    layers.{i}.mlp.w1 [E, d, ff], .w2 [E, ff, d]        experts split over EP   (MoE layers)
    layers.{i}.mlp.gate.weight [d, E]                   replicated
    ln_f.*, lm_head.weight [d, vocab]                   replicated
    logit_scale []                                      replicated (a 0-d scalar)

With `weight_dtype` an FP8 dtype, the qkv/out/up/down weights and the expert stacks w1/w2
are held as FP8 bits, each followed by a float32 `<weight>_scale`, one per output channel
(shape `weight.shape[:-2] + [out]`: [3d] for qkv, split like its bias; [d] for out,
replicated; [E, ff] for w1, split over EP). `dense_weight` dequantizes on use,
`decode(bits) * scale` (the convention of `fd_ray_sync.fp8`); embeddings, norms, biases, the
gate and lm_head stay float32.

With `lora_rank = r > 0`, each projection named in `lora_targets` (qkv, out, up, down; the
MoE layers have no up/down) also holds a LoRA pair, y = base(x) + (x @ A) @ B * alpha / r:

    <proj>.lora_A [in, r]    column-parallel base: replicated;  row-parallel base: split on in
    <proj>.lora_B [r, out]   column-parallel base: split on out; row-parallel base: replicated

B starts at zero, so a model with fresh adapters serves what its base serves. A row-parallel
projection all-reduces x @ A (batch x r) over TP before B, beside the base's own all-reduce.

Parameters may be cleared (`_clear_data()`) and refilled by the weight manager between calls,
so nothing derived from a parameter is ever kept across calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from fd_ray_sync.comm import CommGroups, GroupAllReduce
from fd_ray_sync.config import ParallelConfig
from fd_ray_sync.engine.spec import LORA_PROJECTIONS, ModelConfig
from fd_ray_sync.errors import StateError, WeightMismatchError
from fd_ray_sync.params import param_dtype, write_param
from fd_ray_sync.status import KVCacheStatus
from fd_ray_sync.tensors import to_host

# --- parallel layers ------------------------------------------------------------------------


def create_weight(layer: nn.Layer, name: str, shape: list[int], config: ModelConfig) -> None:
    """`layer.<name>` of `shape` [..., in, out] in `config.weight_dtype`; for FP8 also
    `layer.<name>_scale` [..., out], float32 (ones until the weights arrive)."""
    if not config.is_fp8:
        setattr(layer, name, layer.create_parameter(shape, dtype=config.dtype))
        return
    # paddle has no random initializer for FP8; the weights come from the trainer anyway.
    zeros = nn.initializer.Constant(0.0)
    setattr(
        layer,
        name,
        layer.create_parameter(shape, dtype=config.weight_dtype, default_initializer=zeros),
    )
    scale = layer.create_parameter(
        [*shape[:-2], shape[-1]], dtype="float32", default_initializer=nn.initializer.Constant(1.0)
    )
    setattr(layer, f"{name}_scale", scale)


def dense_weight(layer: nn.Layer, name: str = "weight") -> paddle.Tensor:
    """The float32 weight a matmul uses: `layer.<name>` itself, or its FP8 values times
    `layer.<name>_scale` (per output channel), computed on every call (parameters may be
    rewritten between calls)."""
    weight = getattr(layer, name)
    scale = getattr(layer, f"{name}_scale", None)
    if scale is None:
        return weight
    return weight.astype(scale.dtype) * scale.unsqueeze(-2)


class ColumnParallelLinear(nn.Layer):
    """y = x @ W[:, shard] + b[shard]: output features split over TP; no communication."""

    def __init__(self, in_features: int, out_features: int, parts: int, config: ModelConfig):
        super().__init__()
        create_weight(self, "weight", [in_features, out_features // parts], config)
        self.bias = self.create_parameter([out_features // parts], dtype=config.dtype, is_bias=True)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return paddle.matmul(x, dense_weight(self)) + self.bias


class RowParallelLinear(nn.Layer):
    """y = all_reduce(x[shard] @ W[shard, :]) + b: input features split over TP.

    The bias is replicated and added once, after the partial sums are reduced.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        parts: int,
        reduce: GroupAllReduce,
        config: ModelConfig,
    ):
        super().__init__()
        create_weight(self, "weight", [in_features // parts, out_features], config)
        self.bias = self.create_parameter([out_features], dtype=config.dtype, is_bias=True)
        self._reduce = reduce

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self._reduce(paddle.matmul(x, dense_weight(self))) + self.bias


def _causal_mask(queries: int, start: int) -> paddle.Tensor:
    """[queries, start + queries]: query i (position start + i) sees keys 0..start + i."""
    return paddle.triu(paddle.full([queries, start + queries], float("-inf")), diagonal=start + 1)


class Attention(nn.Layer):
    def __init__(self, config: ModelConfig, tp: int, reduce_tp: GroupAllReduce):
        super().__init__()
        d = config.d_model
        self.local_heads, self.head_dim = config.n_heads // tp, config.head_dim
        # qkv columns are laid out per head as [head][q|k|v][head_dim], so a contiguous
        # column chunk of the full weight is whole heads: exactly what ShardSpec can cut.
        self.qkv = ColumnParallelLinear(d, 3 * d, tp, config)
        self.out = RowParallelLinear(d, d, tp, reduce_tp, config)

    def forward(self, x: paddle.Tensor, start: int, kv: tuple | None) -> paddle.Tensor:
        b, t, _ = x.shape
        qkv = self.qkv(x).reshape([b, t, self.local_heads, 3, self.head_dim])
        q, k, v = qkv.transpose([3, 0, 2, 1, 4]).unbind(0)  # each [b, heads, t, head_dim]
        if kv is not None:
            k_cache, v_cache = kv
            k_cache[:b, :, start : start + t] = k
            v_cache[:b, :, start : start + t] = v
            k, v = k_cache[:b, :, : start + t], v_cache[:b, :, : start + t]
        scores = paddle.matmul(q, k, transpose_y=True) / math.sqrt(self.head_dim)
        attn = paddle.matmul(F.softmax(scores + _causal_mask(t, start), axis=-1), v)
        return self.out(attn.transpose([0, 2, 1, 3]).reshape([b, t, -1]))


class DenseMLP(nn.Layer):
    def __init__(self, config: ModelConfig, tp: int, reduce_tp: GroupAllReduce):
        super().__init__()
        self.up = ColumnParallelLinear(config.d_model, config.d_ff, tp, config)
        self.down = RowParallelLinear(config.d_ff, config.d_model, tp, reduce_tp, config)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.down(F.gelu(self.up(x)))


class MoE(nn.Layer):
    """Top-k routed experts; this rank holds experts [first, first + local) of all E.

    Every rank routes all tokens with the replicated gate, runs its own experts on every
    token, weights each output by the token's routing weight (zero where the expert was not
    chosen), and the EP all-reduce sums the ranks' parts into the full mixture.
    """

    def __init__(self, config: ModelConfig, ep_size: int, ep_rank: int, reduce_ep: GroupAllReduce):
        super().__init__()
        d, ff, self.top_k = config.d_model, config.d_ff, config.top_k
        self.local = config.n_experts // ep_size
        self.first = ep_rank * self.local
        create_weight(self, "w1", [self.local, d, ff], config)
        create_weight(self, "w2", [self.local, ff, d], config)
        self.gate = nn.Linear(d, config.n_experts, bias_attr=False)
        self._reduce = reduce_ep

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        shape = x.shape
        tokens = x.reshape([-1, shape[-1]])  # [n, d]
        probs = F.softmax(self.gate(tokens), axis=-1)
        top_w, top_i = paddle.topk(probs, self.top_k)
        top_w = top_w / top_w.sum(axis=-1, keepdim=True)
        # [n, E]: each token's weight per expert, zero for experts it was not routed to.
        combine = (F.one_hot(top_i, probs.shape[-1]) * top_w.unsqueeze(-1)).sum(axis=1)
        mine = combine[:, self.first : self.first + self.local].transpose([1, 0]).unsqueeze(-1)
        hidden = F.gelu(paddle.matmul(tokens, dense_weight(self, "w1")))  # [local, n, ff]
        out = (paddle.matmul(hidden, dense_weight(self, "w2")) * mine).sum(axis=0)  # [n, d]
        return self._reduce(out).reshape(shape)


def attach_lora(
    layer: nn.Layer,
    kind: Literal["column", "row"],
    rank: int,
    scale: float,
    reduce_tp: GroupAllReduce,
) -> None:
    """Give a parallel linear `layer` a LoRA pair, `lora_A` [in, r] and `lora_B` [r, out]
    (this rank's slices: see the module docstring), added to its output by a forward hook:
    y += (x @ A) @ B * scale, with x @ A summed over TP first when the base is row-parallel.
    The layer's own code is untouched."""
    d_in, d_out = layer.weight.shape
    dtype = layer.weight.dtype
    layer.lora_A = layer.create_parameter(
        [d_in, rank],
        dtype=dtype,
        default_initializer=nn.initializer.Normal(std=1.0 / math.sqrt(d_in)),
    )
    layer.lora_B = layer.create_parameter(
        [rank, d_out], dtype=dtype, default_initializer=nn.initializer.Constant(0.0)
    )

    def add_delta(layer: nn.Layer, inputs: tuple, out: paddle.Tensor) -> paddle.Tensor:
        low = paddle.matmul(inputs[0], layer.lora_A)
        if kind == "row":
            low = reduce_tp(low)
        return out + paddle.matmul(low, layer.lora_B) * scale

    layer.register_forward_post_hook(add_delta)


class Block(nn.Layer):
    def __init__(
        self, config: ModelConfig, layer: int, parallel: ParallelConfig, groups: CommGroups | None
    ):
        super().__init__()
        reduce_tp = GroupAllReduce(groups, "tp", parallel.tp)
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = Attention(config, parallel.tp, reduce_tp)
        self.ln2 = nn.LayerNorm(config.d_model)
        if config.is_moe_layer(layer):
            reduce_ep = GroupAllReduce(groups, "ep", parallel.ep_size)
            self.mlp = MoE(config, parallel.ep_size, parallel.ep_rank, reduce_ep)
        else:
            self.mlp = DenseMLP(config, parallel.tp, reduce_tp)
        for proj in config.lora_targets if config.lora_rank else ():
            owner, linear = proj.split(".")
            layer = getattr(getattr(self, owner), linear, None)  # MoE layers have no up/down
            if layer is not None:
                scale = config.lora_alpha / config.lora_rank
                attach_lora(layer, LORA_PROJECTIONS[proj], config.lora_rank, scale, reduce_tp)

    def forward(self, x: paddle.Tensor, start: int, kv: tuple | None) -> paddle.Tensor:
        x = x + self.attn(self.ln1(x), start, kv)
        return x + self.mlp(self.ln2(x))


# --- KV cache and the model -----------------------------------------------------------------


class KVCache:
    """Preallocated per-layer K and V, [batch, local_heads, max_seq_len, head_dim] each.

    Not a Layer and not registered as buffers, so it never shows up in `state_dict()`.
    """

    def __init__(self, config: ModelConfig, local_heads: int, batch: int = 1):
        self._shape = [batch, local_heads, config.max_seq_len, config.head_dim]
        self._layers, self._dtype = config.n_layers, config.dtype
        self._tensors: list[tuple[paddle.Tensor, paddle.Tensor]] | None = None

    @property
    def status(self) -> KVCacheStatus:
        return KVCacheStatus.CLEARED if self._tensors is None else KVCacheStatus.NORMAL

    def alloc(self) -> None:
        if self._tensors is None:
            self._tensors = [
                (paddle.zeros(self._shape, self._dtype), paddle.zeros(self._shape, self._dtype))
                for _ in range(self._layers)
            ]

    def free(self) -> None:
        self._tensors = None

    def require(self) -> None:
        if self._tensors is None:
            raise StateError("the KV cache is freed; call alloc_kv_cache() before generating")

    def layer(self, index: int) -> tuple[paddle.Tensor, paddle.Tensor]:
        self.require()
        return self._tensors[index]


class DecoderLM(nn.Layer):
    """The full model (no `parallel`/`groups`: one process) or one rank's shard of it.

    Building needs no process group; a forward pass over tp > 1 or EP does, and looks the
    groups up in `groups` at call time.
    """

    def __init__(
        self,
        config: ModelConfig,
        parallel: ParallelConfig | None = None,
        groups: CommGroups | None = None,
    ):
        super().__init__()
        parallel = parallel or ParallelConfig()
        config.check_parallel(parallel)
        self.config = config
        # A 0-d parameter, as real models have (a logit or temperature scale).
        self.logit_scale = self.create_parameter(
            [], dtype=config.dtype, default_initializer=nn.initializer.Constant(1.0)
        )
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_embed = nn.Embedding(config.max_seq_len, config.d_model)
        self.layers = nn.LayerList(
            [Block(config, i, parallel, groups) for i in range(config.n_layers)]
        )
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias_attr=False)
        self.kv_cache = KVCache(config, config.n_heads // parallel.tp)
        self.kv_cache.alloc()
        self._reduce_tp = GroupAllReduce(groups, "tp", parallel.tp)  # agreeing on a stop

    def forward(
        self, tokens: paddle.Tensor, start: int = 0, use_cache: bool = False
    ) -> paddle.Tensor:
        """Logits [batch, t, vocab] for `tokens` [batch, t] at positions start..start+t-1.

        Training: `start=0, use_cache=False` (causal over the whole sequence). Decoding:
        `use_cache=True` writes this chunk's K/V into the cache and attends to all before it.
        """
        t = tokens.shape[1]
        if start + t > self.config.max_seq_len:
            raise ValueError(
                f"positions {start}..{start + t - 1} exceed max_seq_len={self.config.max_seq_len}"
            )
        positions = paddle.arange(start, start + t).unsqueeze(0)
        x = self.embed(tokens) + self.pos_embed(positions)
        for i, block in enumerate(self.layers):
            x = block(x, start, self.kv_cache.layer(i) if use_cache else None)
        return self.lm_head(self.ln_f(x)) * self.logit_scale

    @paddle.no_grad()
    def generate_ids(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        stop: Callable[[], bool] | None = None,
    ) -> list[int]:
        """Greedy continuation of one prompt. Deterministic.

        The prompt keeps its last `max_seq_len - max_new_tokens` tokens (at least one); an
        empty prompt starts from byte 0. There is no stop token, so every TP rank of a
        replica runs the same number of steps and their collectives stay matched. With
        `stop`, the ranks ask it after every token and agree (one all-reduce over TP) to
        end early, all at the same step: what they have so far is returned.
        """
        if max_new_tokens <= 0:
            return []
        self.kv_cache.require()
        limit = self.config.max_seq_len
        ids = list(prompt)[-max(1, limit - max_new_tokens) :] or [0]
        logits = self(paddle.to_tensor([ids], dtype="int64"), start=0, use_cache=True)
        pos, new = len(ids), []
        while True:
            new.append(int(paddle.argmax(logits[0, -1])))
            if len(new) == max_new_tokens or pos == limit or self._stopped(stop):
                return new
            logits = self(paddle.to_tensor([[new[-1]]], dtype="int64"), start=pos, use_cache=True)
            pos += 1

    def _stopped(self, stop: Callable[[], bool] | None) -> bool:
        """Whether any TP rank of the replica was asked to stop (all agree)."""
        if stop is None:
            return False
        if self._reduce_tp.size == 1:
            return stop()
        flag = paddle.to_tensor([1.0 if stop() else 0.0], dtype="float32")
        return float(self._reduce_tp(flag)[0]) > 0


def next_token_loss(logits: paddle.Tensor, tokens: paddle.Tensor) -> paddle.Tensor:
    """Mean cross-entropy of predicting tokens[:, 1:] from logits[:, :-1]."""
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape([-1, vocab]), tokens[:, 1:].reshape([-1, 1]))


def assign_parameters(model: DecoderLM, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy `arrays` (this rank's slices, by parameter name) into `model`'s parameters."""
    params = dict(model.named_parameters())
    missing, unexpected = params.keys() - arrays.keys(), arrays.keys() - params.keys()
    if missing or unexpected:
        raise WeightMismatchError(
            f"state dict does not match the model: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}"
        )
    for name, param in params.items():
        set_parameter(name, param, arrays[name])


def set_parameter(name: str, param: paddle.Tensor, array: np.ndarray) -> None:
    """Copy one array into one parameter after checking shape and dtype.

    Works on cleared parameters too: they get storage of their own again.
    """
    if tuple(array.shape) != tuple(param.shape):
        raise WeightMismatchError(
            f"parameter {name}: shape {tuple(array.shape)} given, model has {tuple(param.shape)}"
        )
    array, dtype = to_host(array)  # FP8 arrives as tagged uint8 bits
    if dtype != param_dtype(param):
        raise WeightMismatchError(
            f"parameter {name}: dtype {dtype} given, model has {param_dtype(param)}"
        )
    write_param(param, array, dtype)
