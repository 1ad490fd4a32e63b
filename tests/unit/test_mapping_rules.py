"""Weight mappings on numpy, torch and paddle tensors: rules, refusals, laziness."""

import numpy as np
import paddle
import pytest
import torch

from fd_ray_sync.engine.spec import ModelConfig, full_shapes
from fd_ray_sync.errors import ConfigError, WeightMismatchError
from fd_ray_sync.mapping import (
    Cast,
    CheckedMappings,
    Fuse,
    Rename,
    Reshape,
    Split,
    Table,
    Transpose,
    WeightMapping,
    cast,
    llama_to_reference,
    manifest_of,
)
from fd_ray_sync.tensors import to_host


def arange(*shape, dtype="float32"):
    return np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)


def applied(mapping, state):
    return {n: to_host(t) for n, t in mapping.apply(state)}


def test_rename_by_regex_and_table_with_transpose():
    state = {"blocks.0.w": arange(2, 3), "blocks.1.w": arange(2, 3) + 6, "head": arange(4)}
    mapping = WeightMapping(
        rules=(
            Rename(
                source=r"blocks\.(\d+)\.w",
                target=r"layers.\1.weight",
                ops=(Transpose(axes=(1, 0)),),
            ),
            Table(names={"head": "lm_head"}),
        )
    )
    engine = {"layers.0.weight": ((3, 2), "float32"), "layers.1.weight": ((3, 2), "float32")}
    engine |= {"lm_head": ((4,), "float32")}
    mapping.check(manifest_of(state), engine)
    out = applied(mapping, state)
    assert list(out) == ["layers.0.weight", "layers.1.weight", "lm_head"]
    np.testing.assert_array_equal(out["layers.1.weight"][0], state["blocks.1.w"].T)
    assert out["lm_head"][0] is state["head"]  # a plain rename copies nothing


def test_fuse_then_split_is_a_round_trip():
    q, k, v = arange(2, 4), arange(2, 4) + 8, arange(2, 4) + 16
    fuse = WeightMapping(
        rules=(Fuse(sources=(r"(.*)\.q", r"(.*)\.k", r"(.*)\.v"), target=r"\1.qkv", axis=0),)
    )
    fused = applied(fuse, {"a.q": q, "a.k": k, "a.v": v})
    np.testing.assert_array_equal(fused["a.qkv"][0], np.concatenate([q, k, v]))
    split = WeightMapping(
        rules=(Split(source=r"(.*)\.qkv", targets=(r"\1.q", r"\1.k", r"\1.v"), axis=0),)
    )
    back = applied(split, {"a.qkv": fused["a.qkv"][0]})
    for name, want in (("a.q", q), ("a.k", k), ("a.v", v)):
        np.testing.assert_array_equal(back[name][0], want)
    uneven = Split(source="x", targets=("a", "b"), axis=1, sizes=(1, 3))
    out = applied(WeightMapping(rules=(uneven,)), {"x": arange(2, 4)})
    assert out["a"][0].shape == (2, 1) and out["b"][0].shape == (2, 3)


def test_stack_and_reshape_shapes_are_checked_without_data():
    mapping = WeightMapping(
        rules=(
            Fuse(
                sources=(r"e0\.w", r"e1\.w"),
                target="w",
                stack=True,
                ops=(Transpose(axes=(0, 2, 1)), Reshape(shape=(2, -1))),
            ),
        )
    )
    source = {"e0.w": ((3, 4), "float32"), "e1.w": ((3, 4), "float32")}
    mapping.check(source, {"w": ((2, 12), "float32")})
    with pytest.raises(WeightMismatchError, match=r"'w' from \['e0.w', 'e1.w'\] comes out"):
        mapping.check(source, {"w": ((12, 2), "float32")})
    out = applied(mapping, {"e0.w": arange(3, 4), "e1.w": arange(3, 4) + 12})
    want = np.stack([arange(3, 4), arange(3, 4) + 12]).transpose(0, 2, 1).reshape(2, -1)
    np.testing.assert_array_equal(out["w"][0], want)


def test_cast_float32_bfloat16_round_trip_and_framework_tensors():
    x = np.array([1.0, -2.5, 3.140625, 1e-3, np.inf, np.nan], dtype=np.float32)
    bits = cast(x, "float32", "bfloat16")
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bits[:5], want[:5])  # round to nearest even, as torch does
    back = cast(bits, "bfloat16", "float32")
    np.testing.assert_array_equal(back[:4], torch.from_numpy(x[:4]).bfloat16().float().numpy())
    assert np.isinf(back[4]) and np.isnan(back[5])

    state = {"t": torch.from_numpy(x[:4].copy()), "p": paddle.to_tensor(x[:4]).astype("bfloat16")}
    mapping = WeightMapping(
        rules=(
            Table(names={"t": "t16"}, ops=(Cast(dtype="bfloat16"),)),
            Table(names={"p": "p32"}, ops=(Cast(dtype="float32"),)),
        )
    )
    engine = {"t16": ((4,), "bfloat16"), "p32": ((4,), "float32")}
    mapping.check(manifest_of(state), engine)
    out = dict(mapping.apply(state))
    assert out["t16"].dtype == torch.bfloat16  # numpy has no bfloat16: handed on as torch
    assert torch.equal(out["t16"], state["t"].bfloat16())
    np.testing.assert_array_equal(out["p32"], state["p"].astype("float32").numpy())
    with pytest.raises(WeightMismatchError, match="'t16' .* comes out float32"):
        WeightMapping(rules=(Table(names={"t": "t16"}),)).check(
            {"t": ((4,), "float32")}, {"t16": ((4,), "bfloat16")}
        )


def test_unmapped_and_doubly_mapped_names_are_refused_by_name():
    mapping = WeightMapping(
        rules=(
            Rename(source=r"layer\.(\d+)\.w", target=r"w\1"),
            Rename(source=r"layer\.0\.(w)", target=r"other_\1"),
        )
    )
    source = {"layer.0.w": ((2,), "float32"), "layer.1.w": ((2,), "float32")}
    source |= {"stray": ((2,), "float32")}
    engine = {"w0": ((2,), "float32"), "w1": ((2,), "float32"), "w2": ((2,), "float32")}
    with pytest.raises(WeightMismatchError) as err:
        mapping.check(source, engine)
    msg = str(err.value)
    assert "mapped by no rule: ['stray']" in msg
    assert "mapped twice: 'layer.0.w' (rules [0, 1])" in msg
    assert "made but not in the engine: ['other_w']" in msg
    assert "engine names made by nothing: ['w2']" in msg
    with pytest.raises(WeightMismatchError, match="stray"):
        mapping.apply({"stray": arange(2)})  # apply refuses on names too


def test_engine_names_made_twice_and_half_fused_sources_are_named():
    mapping = WeightMapping(
        rules=(
            Table(names={"qkv": "attn"}),
            Fuse(sources=(r"q", r"k", r"v"), target="attn"),
        )
    )
    source = {n: ((2,), "float32") for n in ("qkv", "q", "k", "v")}
    with pytest.raises(WeightMismatchError, match=r"engine names made twice: 'attn'"):
        mapping.check(source, {"attn": ((6,), "float32")})
    with pytest.raises(WeightMismatchError, match=r"'attn' is fused from \['q', None, 'v'\]"):
        mapping.check({"q": ((2,), "float32"), "v": ((2,), "float32")}, {"attn": ((6,), "float32")})


def test_apply_is_lazy_one_rule_at_a_time():
    class Watched(dict):
        read: list

        def __getitem__(self, name):
            self.read.append(name)
            return super().__getitem__(name)

    state = Watched({f"l{i}.{p}": arange(2) for i in range(3) for p in "ab"})
    state.read = []
    mapping = WeightMapping(rules=(Fuse(sources=(r"l(\d)\.a", r"l(\d)\.b"), target=r"fused\1"),))
    pairs = mapping.apply(state)
    assert state.read == []
    assert next(pairs)[0] == "fused0" and state.read == ["l0.a", "l0.b"]
    assert next(pairs)[0] == "fused1" and state.read[2:] == ["l1.a", "l1.b"]


TINY_DENSE = ModelConfig(d_model=8, n_layers=2, n_heads=2, d_ff=12, max_seq_len=4, n_experts=0)
TINY_MOE = ModelConfig(
    d_model=8, n_layers=2, n_heads=2, d_ff=12, max_seq_len=4, n_experts=3, moe_every=2, top_k=1
)


def llama_manifest(config, fused_qkv):
    """Hugging Face-style names and [out, in] shapes for `config` (written out by hand)."""
    d, ff, v = config.d_model, config.d_ff, config.vocab_size
    m = {"logit_scale": (), "model.embed_tokens.weight": (v, d)}
    m["model.embed_positions.weight"] = (config.max_seq_len, d)
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            m |= {p + norm + ".weight": (d,), p + norm + ".bias": (d,)}
        if fused_qkv:
            m |= {
                p + "self_attn.qkv_proj.weight": (3 * d, d),
                p + "self_attn.qkv_proj.bias": (3 * d,),
            }
        else:
            for x in "qkv":
                m |= {
                    p + f"self_attn.{x}_proj.weight": (d, d),
                    p + f"self_attn.{x}_proj.bias": (d,),
                }
        m |= {p + "self_attn.o_proj.weight": (d, d), p + "self_attn.o_proj.bias": (d,)}
        if config.is_moe_layer(i):
            m[p + "block_sparse_moe.gate.weight"] = (config.n_experts, d)
            for e in range(config.n_experts):
                m[p + f"block_sparse_moe.experts.{e}.w1.weight"] = (ff, d)
                m[p + f"block_sparse_moe.experts.{e}.w2.weight"] = (d, ff)
        else:
            m |= {p + "mlp.up_proj.weight": (ff, d), p + "mlp.up_proj.bias": (ff,)}
            m |= {p + "mlp.down_proj.weight": (d, ff), p + "mlp.down_proj.bias": (d,)}
    m |= {"model.norm.weight": (d,), "model.norm.bias": (d,), "lm_head.weight": (v, d)}
    return {n: (s, "float32") for n, s in m.items()}


@pytest.mark.parametrize("config", [TINY_DENSE, TINY_MOE], ids=["dense", "moe"])
@pytest.mark.parametrize("fused_qkv", [True, False], ids=["qkv_proj", "q_k_v_proj"])
def test_llama_mapping_fits_the_reference_engine(config, fused_qkv):
    engine = {n: (s, "float32") for n, s in full_shapes(config).items()}
    llama_to_reference(config).check(llama_manifest(config, fused_qkv), engine)


def test_llama_qkv_columns_are_laid_out_per_head():
    config, d, hd = TINY_DENSE, 8, 4
    source = {n: np.zeros(s, np.float32) for n, (s, _) in llama_manifest(config, False).items()}
    rng = np.random.default_rng(0)
    for x in "qkv":
        source[f"model.layers.0.self_attn.{x}_proj.weight"] = rng.standard_normal(
            (d, d), np.float32
        )
    out = dict(llama_to_reference(config).apply(source))
    qkv = out["layers.0.attn.qkv.weight"]  # [d_in, 3d]: columns [head][q|k|v][head_dim]
    for h in range(2):
        for j, x in enumerate("qkv"):
            rows = source[f"model.layers.0.self_attn.{x}_proj.weight"][h * hd : (h + 1) * hd]
            cols = qkv[:, (3 * h + j) * hd : (3 * h + j + 1) * hd]
            np.testing.assert_array_equal(cols, rows.T)


def test_llama_refuses_what_the_reference_lacks_by_name():
    source = llama_manifest(TINY_MOE, True)
    source["model.layers.0.mlp.gate_proj.weight"] = ((12, 8), "float32")
    source["model.layers.1.block_sparse_moe.experts.0.w3.weight"] = ((12, 8), "float32")
    engine = {n: (s, "float32") for n, s in full_shapes(TINY_MOE).items()}
    with pytest.raises(WeightMismatchError) as err:
        llama_to_reference(TINY_MOE).check(source, engine)
    assert "'model.layers.0.mlp.gate_proj.weight'" in str(err.value)
    assert "'model.layers.1.block_sparse_moe.experts.0.w3.weight'" in str(err.value)


def test_checked_mappings_ask_the_engine_once_and_check_each_layout_once():
    asked = []

    def engine():
        asked.append(1)
        return {"w": ([2, 3], "float32")}  # as it comes over Ray: lists

    checks = CheckedMappings(engine)
    mapping = WeightMapping(rules=(Table(names={"v": "w"}, ops=(Transpose(axes=(1, 0)),)),))
    for _ in range(3):
        out = checks.mapped({"v": arange(3, 2)}, mapping)
        assert dict(out.items())["w"].shape == (2, 3)
    checks.mapped(iter([("v", arange(3, 2))]), mapping)  # pairs are taken too
    assert asked == [1] and len(checks._passed) == 1
    with pytest.raises(WeightMismatchError, match=r"mapped by no rule: \['x'\]"):
        checks.mapped({"v": arange(3, 2), "x": arange(1)}, mapping)
    with pytest.raises(ConfigError, match="not a int"):
        checks.mapped(3, mapping)


def test_mapped_views_pack_into_buckets_and_ring_slots():
    from fd_ray_sync.buckets import iter_buckets
    from fd_ray_sync.ipc import BucketRing

    state = {"a": arange(3, 4), "b": torch.arange(6, dtype=torch.float32).bfloat16()}
    mapping = WeightMapping(
        rules=(Table(names={"a": "aT"}, ops=(Transpose(axes=(1, 0)),)), Table(names={"b": "b"}))
    )
    (meta, arrays), *_ = list(iter_buckets(mapping.mapped(state), 1 << 20))
    assert [(t.name, t.shape, t.dtype) for t in meta.tensors] == [
        ("aT", (4, 3), "float32"),
        ("b", (6,), "bfloat16"),
    ]
    np.testing.assert_array_equal(arrays[0], state["a"].T)
    ring = BucketRing(2, 1 << 20, shared=False)
    packed = ring.pack(0, list(mapping.apply(state)))
    t = packed.tensors[0]
    got = ring.slots[0][t.offset : t.offset + t.nbytes].view(np.float32).reshape(t.shape)
    np.testing.assert_array_equal(got, state["a"].T)
    ring.close()
