"""The reference engine's model: a small decoder-only LM with real tensor and expert parallelism.

One class serves as the trainer's full model (one process, no groups, autograd works) and as
one rank's shard of it: parameter names are the same in both, only shapes differ, and
`shard_plan()` says which slice of each full parameter a rank holds. Layouts (paddle Linear
weights are [in_features, out_features]):

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
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fd_ray_sync.comm import CommGroups
from fd_ray_sync.config import ParallelConfig
from fd_ray_sync.engine.tokenizer import VOCAB_SIZE
from fd_ray_sync.errors import ConfigError, StateError, WeightMismatchError
from fd_ray_sync.params import param_dtype, write_param
from fd_ray_sync.sharding import REPLICATED, ShardSpec
from fd_ray_sync.status import KVCacheStatus
from fd_ray_sync.tensors import to_host

_ITEMSIZE = {"float32": 4, "float8_e4m3fn": 1, "float8_e5m2": 1}
# Within a block: the weights held in FP8 when `weight_dtype` is an FP8 dtype.
_QUANTIZED = ("attn.qkv.weight", "attn.out.weight", "mlp.up.weight", "mlp.down.weight")
_QUANTIZED_MOE = ("mlp.w1", "mlp.w2")

# The projections a LoRA adapter can target, and how each base splits over TP.
LORA_PROJECTIONS: Mapping[str, Literal["column", "row"]] = {
    "attn.qkv": "column",
    "attn.out": "row",
    "mlp.up": "column",
    "mlp.down": "row",
}

# --- configuration and pure planning functions --------------------------------------------


class ModelConfig(BaseModel):
    """Shape of the reference LM. Divisibility by the parallel layout is checked at build time."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    vocab_size: int = Field(
        VOCAB_SIZE, ge=VOCAB_SIZE, le=VOCAB_SIZE, description="Must be 256: byte tokenizer."
    )
    d_model: int = Field(64, ge=1, description="Hidden size.")
    n_layers: int = Field(2, ge=1, description="Number of transformer blocks.")
    n_heads: int = Field(4, ge=1, description="Attention heads (split over TP ranks).")
    d_ff: int = Field(128, ge=1, description="MLP / expert inner size (dense MLP split over TP).")
    max_seq_len: int = Field(128, ge=2, description="Positions (and KV-cache length).")
    n_experts: int = Field(0, ge=0, description="Experts per MoE layer; 0 means no MoE.")
    moe_every: int = Field(2, ge=1, description="Every k-th block's MLP is MoE (n_experts > 0).")
    top_k: int = Field(2, ge=1, description="Experts each token is routed to.")
    dtype: Literal["float32"] = Field("float32", description="Parameter dtype.")
    weight_dtype: Literal["float32", "float8_e4m3fn", "float8_e5m2"] = Field(
        "float32",
        description="dtype of the attention, MLP and expert weights; an FP8 dtype adds a "
        "float32 `<weight>_scale` per output channel, dequantized on use.",
    )
    lora_rank: int = Field(0, ge=0, description="Rank r of the LoRA adapters; 0: none.")
    lora_targets: tuple[str, ...] = Field(
        ("attn.qkv", "attn.out"),
        description=f"Projections that get an adapter, among {', '.join(LORA_PROJECTIONS)}.",
    )
    lora_alpha: float = Field(8.0, gt=0, description="LoRA scale numerator: delta * alpha / r.")

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        unknown = sorted(set(self.lora_targets) - set(LORA_PROJECTIONS))
        if unknown:
            raise ValueError(
                f"unknown lora_targets {unknown}; known: {', '.join(LORA_PROJECTIONS)}"
            )
        if self.n_experts and self.top_k > self.n_experts:
            raise ValueError(f"top_k={self.top_k} exceeds n_experts={self.n_experts}")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def is_fp8(self) -> bool:
        return self.weight_dtype != "float32"

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_experts > 0 and layer % self.moe_every == self.moe_every - 1

    def check_parallel(self, parallel: ParallelConfig) -> None:
        """Raise ConfigError naming the field that does not split over `parallel`."""
        for field, value, over, size in (
            ("n_heads", self.n_heads, "tp", parallel.tp),
            ("d_ff", self.d_ff, "tp", parallel.tp),
            ("n_experts", self.n_experts, "ep_size", parallel.ep_size),
        ):
            if value % size:
                raise ConfigError(f"model {field}={value} is not divisible by {over}={size}")


PRESETS: Mapping[str, ModelConfig] = {
    # Small enough for multi-process CPU tests; one dense block and one MoE block.
    "tiny": ModelConfig(
        d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=128, n_experts=4, moe_every=2
    ),
    # "tiny" with its attention, MLP and expert weights in float8_e4m3fn (+ float32 scales).
    "tiny_fp8": ModelConfig(
        d_model=64,
        n_layers=2,
        n_heads=4,
        d_ff=128,
        max_seq_len=128,
        n_experts=4,
        moe_every=2,
        weight_dtype="float8_e4m3fn",
    ),
    # Just over 1 GiB of float32 weights, for transfer benchmarks.
    "large_1g": ModelConfig(
        d_model=2048, n_layers=7, n_heads=16, d_ff=5632, max_seq_len=512, n_experts=0
    ),
    # `tiny` with rank-4 LoRA adapters on every projection that has one (partial updates).
    "tiny_lora": ModelConfig(
        d_model=64,
        n_layers=2,
        n_heads=4,
        d_ff=128,
        max_seq_len=128,
        n_experts=4,
        moe_every=2,
        lora_rank=4,
        lora_targets=tuple(LORA_PROJECTIONS),
    ),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def full_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's full (unsharded) shape, in the model's `state_dict()` order."""
    d, ff, e = config.d_model, config.d_ff, config.n_experts
    shapes: dict[str, tuple[int, ...]] = {
        "logit_scale": (),  # the model's own parameter comes before its sublayers'
        "embed.weight": (config.vocab_size, d),
        "pos_embed.weight": (config.max_seq_len, d),
    }
    for i in range(config.n_layers):
        p = f"layers.{i}."
        shapes |= {
            p + "ln1.weight": (d,),
            p + "ln1.bias": (d,),
            p + "attn.qkv.weight": (d, 3 * d),
            p + "attn.qkv.bias": (3 * d,),
            p + "attn.out.weight": (d, d),
            p + "attn.out.bias": (d,),
            p + "ln2.weight": (d,),
            p + "ln2.bias": (d,),
        }
        if config.is_moe_layer(i):
            # A layer's own parameters come before its sublayers' in paddle's state_dict.
            shapes |= {
                p + "mlp.w1": (e, d, ff),
                p + "mlp.w2": (e, ff, d),
                p + "mlp.gate.weight": (d, e),
            }
        else:
            shapes |= {
                p + "mlp.up.weight": (d, ff),
                p + "mlp.up.bias": (ff,),
                p + "mlp.down.weight": (ff, d),
                p + "mlp.down.bias": (d,),
            }
    shapes |= {"ln_f.weight": (d,), "ln_f.bias": (d,), "lm_head.weight": (d, config.vocab_size)}
    if config.is_fp8:
        shapes = _with_scales(config, shapes)
    return _with_lora(config, shapes) if config.lora_rank else shapes


def _with_scales(config: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> dict:
    """Each FP8 weight followed by its scale, as the layers create them."""
    with_scales: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        with_scales[name] = shape
        if name in quantized_names(config):
            with_scales[f"{name}_scale"] = (*shape[:-2], shape[-1])
    return with_scales


def quantized_names(config: ModelConfig) -> frozenset[str]:
    """The full model's weights held in `config.weight_dtype` when that is an FP8 dtype
    (empty for float32 weights); the trainer quantizes these (`fp8.quantize_state_dict`)."""
    if not config.is_fp8:
        return frozenset()
    names = set()
    for i in range(config.n_layers):
        suffixes = _QUANTIZED_MOE if config.is_moe_layer(i) else _QUANTIZED[2:]
        names |= {f"layers.{i}.{suffix}" for suffix in (*_QUANTIZED[:2], *suffixes)}
    return frozenset(names)


def full_dtypes(config: ModelConfig) -> dict[str, str]:
    """Every parameter's dtype string, in `full_shapes` order."""
    fp8 = quantized_names(config)
    return {n: config.weight_dtype if n in fp8 else config.dtype for n in full_shapes(config)}


def _with_lora(config: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> dict:
    """`shapes` with each targeted projection's LoRA pair after its bias (state_dict order:
    the adapter is added to the projection after its weight and bias)."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        out[name] = shape
        proj = name.removesuffix(".bias")
        if name.startswith("layers.") and proj.split(".", 2)[2] in config.lora_targets:
            d_in, d_out = shapes[proj + ".weight"]
            out[proj + ".lora_A"] = (d_in, config.lora_rank)
            out[proj + ".lora_B"] = (config.lora_rank, d_out)
    return out


def lora_names(config: ModelConfig) -> list[str]:
    """The adapters' parameter names (what an adapter-only update carries)."""
    return [n for n in full_shapes(config) if n.endswith((".lora_A", ".lora_B"))]


def param_bytes(config: ModelConfig) -> int:
    """Bytes of the full model's parameters, computed from shapes without allocating."""
    shapes = full_shapes(config)
    return sum(_ITEMSIZE[d] * math.prod(shapes[n]) for n, d in full_dtypes(config).items())


def _split(axis: int, parts: int, index: int) -> ShardSpec:
    return REPLICATED if parts == 1 else ShardSpec(axis=axis, parts=parts, index=index)


def shard_plan(config: ModelConfig, parallel: ParallelConfig) -> dict[str, ShardSpec]:
    """Parameter name -> the slice of the full parameter that `parallel.rank` holds."""
    config.check_parallel(parallel)
    tp, r = parallel.tp, parallel.tp_rank
    column, column_bias, row = _split(1, tp, r), _split(0, tp, r), _split(0, tp, r)
    experts = _split(0, parallel.ep_size, parallel.ep_rank)
    # Keyed by the name inside a block ("attn.qkv.weight"); anything else is replicated.
    by_suffix = {
        "attn.qkv.weight": column,
        "attn.qkv.bias": column_bias,
        "attn.out.weight": row,
        "mlp.up.weight": column,
        "mlp.up.bias": column_bias,
        "mlp.down.weight": row,
        "mlp.w1": experts,
        "mlp.w2": experts,
        # FP8 scales, one per output channel: split where the output axis is.
        "attn.qkv.weight_scale": column_bias,
        "mlp.up.weight_scale": column_bias,
        "mlp.w1_scale": experts,
        "mlp.w2_scale": experts,
    }
    for proj, kind in LORA_PROJECTIONS.items():  # A splits like the base's input, B its output
        by_suffix[proj + ".lora_A"] = row if kind == "row" else REPLICATED
        by_suffix[proj + ".lora_B"] = column if kind == "column" else REPLICATED
    return {
        name: by_suffix.get(name.split(".", 2)[2], REPLICATED)
        if name.startswith("layers.")
        else REPLICATED
        for name in full_shapes(config)
    }


# --- parallel layers ------------------------------------------------------------------------


class GroupAllReduce:
    """Sums a tensor in place over this rank's TP or EP group (identity when `size == 1`).

    The group is looked up on every call, never stored: restarting the communication groups
    destroys them and creates new ones.
    """

    def __init__(self, groups: CommGroups | None, kind: Literal["tp", "ep"], size: int):
        self.groups, self.kind, self.size = groups, kind, size

    def __call__(self, x: paddle.Tensor) -> paddle.Tensor:
        if self.size == 1:
            return x
        group = getattr(self.groups, f"{self.kind}_group", None)
        if group is None:
            rank = self.groups.parallel.rank if self.groups is not None else "?"
            raise StateError(
                f"rank {rank}: the {self.kind.upper()} group (size {self.size}) is not up; "
                "start or restart the communication groups before a forward pass"
            )
        paddle.distributed.all_reduce(x, group=group)
        return x


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
