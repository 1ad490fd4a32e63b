"""The reference model's configuration and planning, without paddle: presets, every
parameter's full shape and dtype, and which slice of it each TP/EP rank holds
(`shard_plan`). The layers that hold and use these parameters are in
fd_ray_sync.engine.model, whose docstring shows the layouts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fd_ray_sync.config import ParallelConfig
from fd_ray_sync.engine.tokenizer import VOCAB_SIZE
from fd_ray_sync.errors import ConfigError
from fd_ray_sync.sharding import REPLICATED, ShardSpec

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


# Small enough for multi-process CPU tests; one dense block and one MoE block.
_TINY = dict(d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=128, n_experts=4, moe_every=2)

# The "tiny" preset without its MoE block: the torch reference LM's default (it has no MoE).
TINY_DENSE = ModelConfig(d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=128, n_experts=0)

PRESETS: Mapping[str, ModelConfig] = {
    "tiny": ModelConfig(**_TINY),
    # "tiny" with its attention, MLP and expert weights in float8_e4m3fn (+ float32 scales).
    "tiny_fp8": ModelConfig(**_TINY, weight_dtype="float8_e4m3fn"),
    # Just over 1 GiB of float32 weights, for transfer benchmarks.
    "large_1g": ModelConfig(
        d_model=2048, n_layers=7, n_heads=16, d_ff=5632, max_seq_len=512, n_experts=0
    ),
    # `tiny` with rank-4 LoRA adapters on every projection that has one (partial updates).
    "tiny_lora": ModelConfig(**_TINY, lora_rank=4, lora_targets=tuple(LORA_PROJECTIONS)),
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
