"""A ready mapping: Hugging Face Llama / Mixtral names and layouts -> the reference engine's.

Built from the rules of `fd_ray_sync.mapping.rules` only (data, no code of its own), so it
doubles as a worked example of a mapping for another model; docs/mapping.md walks through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fd_ray_sync.mapping.ops import Reshape, Transpose
from fd_ray_sync.mapping.rules import Fuse, Rename, Table, WeightMapping

if TYPE_CHECKING:
    from fd_ray_sync.engine.spec import ModelConfig


def llama_to_reference(config: ModelConfig) -> WeightMapping:
    """Hugging Face Llama / Mixtral names and [out, in] Linear layouts -> the reference
    engine's (`fd_ray_sync.engine.model`, [in, out] Linears). Both attention layouts map:
    separate `q_proj`, `k_proj`, `v_proj` (fused here) or one `qkv_proj` (rows [q; k; v]);
    either way the columns are re-laid per head as the engine's [head][q|k|v][head_dim].

    The architecture stays the reference's, so the checkpoint carries what Llama lacks
    under HF-style names (biases on every Linear and norm, `model.embed_positions.weight`,
    `logit_scale`), and what the reference lacks is refused by name as unmapped: a gated
    MLP's `gate_proj` / `gate_up_proj` and an expert's `w3` (the reference MLP and experts
    are ungated GELU). Experts are Mixtral's `block_sparse_moe.experts.{e}.w1` (in) and
    `.w2` (out), stacked into the engine's [E, ...] tensors.
    """
    d, heads = config.d_model, config.n_heads
    layer = r"model\.layers\.(\d+)\."
    t = Transpose(axes=(1, 0))
    # [q; k; v] rows (each [heads][head_dim]) -> [head][q|k|v][head_dim] columns.
    qkv_weight = (Reshape(shape=(3, heads, -1, d)), Transpose(axes=(1, 0, 2, 3)))
    qkv_weight += (Reshape(shape=(3 * d, d)), t)
    qkv_bias = (Reshape(shape=(3, heads, -1)), Transpose(axes=(1, 0, 2)), Reshape(shape=(3 * d,)))
    attn = layer + r"self_attn\."
    rules: list[Any] = [
        Table(names={"model.embed_tokens.weight": "embed.weight"}),
        Table(names={"model.embed_positions.weight": "pos_embed.weight"}),
        Table(names={"logit_scale": "logit_scale"}),
        Table(names={"lm_head.weight": "lm_head.weight"}, ops=(t,)),
        Rename(source=r"model\.norm\.(weight|bias)", target=r"ln_f.\1"),
        Rename(source=layer + r"input_layernorm\.(weight|bias)", target=r"layers.\1.ln1.\2"),
        Rename(
            source=layer + r"post_attention_layernorm\.(weight|bias)", target=r"layers.\1.ln2.\2"
        ),
        Rename(
            source=attn + r"qkv_proj\.weight", target=r"layers.\1.attn.qkv.weight", ops=qkv_weight
        ),
        Rename(source=attn + r"qkv_proj\.bias", target=r"layers.\1.attn.qkv.bias", ops=qkv_bias),
        Fuse(
            sources=tuple(attn + rf"{p}_proj\.weight" for p in "qkv"),
            target=r"layers.\1.attn.qkv.weight",
            ops=qkv_weight,
        ),
        Fuse(
            sources=tuple(attn + rf"{p}_proj\.bias" for p in "qkv"),
            target=r"layers.\1.attn.qkv.bias",
            ops=qkv_bias,
        ),
        Rename(source=attn + r"o_proj\.weight", target=r"layers.\1.attn.out.weight", ops=(t,)),
        Rename(source=attn + r"o_proj\.bias", target=r"layers.\1.attn.out.bias"),
        Rename(
            source=layer + r"mlp\.(up|down)_proj\.weight",
            target=r"layers.\1.mlp.\2.weight",
            ops=(t,),
        ),
        Rename(source=layer + r"mlp\.(up|down)_proj\.bias", target=r"layers.\1.mlp.\2.bias"),
    ]
    if config.n_experts:
        moe = layer + r"block_sparse_moe\."
        rules.append(
            Rename(source=moe + r"gate\.weight", target=r"layers.\1.mlp.gate.weight", ops=(t,))
        )
        for w in ("w1", "w2"):  # each expert's [out, in] -> stacked [E, in, out]
            rules.append(
                Fuse(
                    sources=tuple(
                        moe + rf"experts\.{e}\.{w}\.weight" for e in range(config.n_experts)
                    ),
                    target=rf"layers.\1.mlp.{w}",
                    stack=True,
                    ops=(Transpose(axes=(0, 2, 1)),),
                )
            )
    return WeightMapping(rules=tuple(rules))
