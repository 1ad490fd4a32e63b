"""FP8 (float8_e4m3fn, float8_e5m2) as uint8 bits end to end, on real numpy, torch and paddle:
the codec against both frameworks' casts, framework tensors in and out, safetensors interop
with the official library, checksums, shard slices, buckets and the reference model's FP8
preset. (Parameter writes of FP8 are in test_params.py, with the other dtypes.)"""

import numpy as np
import paddle
import pytest
import safetensors.torch
import torch

from fd_ray_sync import fp8, ipc, shm
from fd_ray_sync.buckets import iter_buckets, slice_checksums
from fd_ray_sync.checksum import digest, digests, fingerprint
from fd_ray_sync.config import ParallelConfig
from fd_ray_sync.engine.model import DecoderLM, dense_weight
from fd_ray_sync.engine.reference import ReferenceEngine, init_full_state_dict
from fd_ray_sync.engine.spec import (
    full_dtypes,
    full_shapes,
    param_bytes,
    preset,
    quantized_names,
    shard_plan,
)
from fd_ray_sync.errors import WeightMismatchError
from fd_ray_sync.params import model_parameters, param_dtype, read_param
from fd_ray_sync.safetensors_io import SafetensorsFile, write_safetensors
from fd_ray_sync.sharding import ShardSpec, take_shard
from fd_ray_sync.tensors import TaggedBits, all_finite, shape_and_dtype, tagged, to_host

FP8 = list(fp8.FP8_DTYPES)
ALL_BITS = np.arange(256, dtype=np.uint8)


def in_range(dtype, n=20000, seed=0):
    """float32 values inside `dtype`'s range at many magnitudes, every representable value
    and every midpoint between neighbours (the ties)."""
    rng = np.random.default_rng(seed)
    table = fp8.value_table(dtype)
    finite = np.sort(table[np.isfinite(table) & (table >= 0)])
    x = np.concatenate(
        [rng.standard_normal(n) * s for s in (1e-5, 1e-2, 1.0, 40.0, fp8.max_value(dtype) / 4)]
        + [finite, (finite[1:] + finite[:-1]) / 2]
    ).astype(np.float32)
    x = np.concatenate([x, -x])
    return np.clip(x, -fp8.max_value(dtype), fp8.max_value(dtype))


@pytest.mark.parametrize("dtype", FP8)
def test_decode_and_encode_match_torch_and_paddle_bit_for_bit(dtype):
    want = torch.from_numpy(ALL_BITS).view(getattr(torch, dtype)).float().numpy()
    np.testing.assert_array_equal(fp8.decode(ALL_BITS, dtype), want)  # NaNs where they are
    got = paddle.to_tensor(ALL_BITS).view(getattr(paddle, dtype)).astype("float32").numpy()
    np.testing.assert_array_equal(got, want)
    x = in_range(dtype)
    bits = fp8.encode(x, dtype)
    np.testing.assert_array_equal(
        bits, torch.from_numpy(x).to(getattr(torch, dtype)).view(torch.uint8)
    )
    paddle_bits = paddle.to_tensor(x).astype(getattr(paddle, dtype)).view(paddle.uint8).numpy()
    np.testing.assert_array_equal(bits, paddle_bits)
    assert fp8.encode(np.float32(1e9), dtype) == fp8.encode(
        fp8.max_value(dtype), dtype
    )  # saturates


@pytest.mark.parametrize("dtype", FP8)
def test_quantize_keeps_each_output_channel_within_its_step(dtype):
    w = np.random.default_rng(1).standard_normal((2, 64, 48)).astype(np.float32)  # [E, in, out]
    w[0, :, 5] = 0  # an all-zero channel gets scale 1, not a division by zero
    bits, scale = fp8.quantize(w, dtype)
    assert bits.dtype == np.uint8 and bits.shape == w.shape
    assert scale.dtype == np.float32 and scale.shape == (2, 48) and scale[0, 5] == 1
    # The channel's largest magnitude lands on the largest FP8 value.
    assert np.abs(fp8.decode(bits, dtype)).max(axis=-2)[1].tolist() == [fp8.max_value(dtype)] * 48
    back = fp8.dequantize(bits, scale, dtype)
    step = {"float8_e4m3fn": 2.0**-3, "float8_e5m2": 2.0**-2}[dtype]  # relative, at the top
    assert (np.abs(back - w) <= step * np.abs(w).max(axis=-2, keepdims=True)).all()
    with pytest.raises(WeightMismatchError, match="not an FP8 dtype"):
        fp8.quantize(w, "bfloat16")


@pytest.mark.parametrize("dtype", FP8)
def test_framework_tensors_and_tagged_numpy_cross_as_the_same_bits(dtype):
    bits = fp8.encode(in_range(dtype, n=10)[:60].reshape(6, 10), dtype)
    tensors = {
        "torch": torch.from_numpy(bits.copy()).view(getattr(torch, dtype)),
        "paddle": paddle.to_tensor(bits).view(getattr(paddle, dtype)),
        "numpy": tagged(bits, dtype),
    }
    for kind, tensor in tensors.items():
        host, got_dtype = to_host(tensor)
        assert got_dtype == dtype, kind
        assert type(host) is np.ndarray and host.dtype == np.uint8, kind  # plain bits cross
        np.testing.assert_array_equal(host, bits)
        assert shape_and_dtype(tensor) == ((6, 10), dtype)
    strided = take_shard(tensors["numpy"], ShardSpec(axis=1, parts=2, index=1))
    assert isinstance(strided, TaggedBits) and strided.bits_dtype == dtype  # slices keep it
    np.testing.assert_array_equal(to_host(strided)[0], bits[:, 5:])
    with pytest.raises(WeightMismatchError, match="needs no tag"):
        tagged(bits, "uint8")


def test_nan_and_inf_are_seen_in_fp8_bits():
    one = {"float8_e4m3fn": 0x38, "float8_e5m2": 0x3C}
    bad = {"float8_e4m3fn": (0x7F, 0xFF), "float8_e5m2": (0x7C, 0xFC, 0x7D, 0xFF)}  # e4m3fn: NaN
    for dtype in FP8:
        ones = np.full(4, one[dtype], np.uint8)
        assert fp8.decode(ones, dtype).tolist() == [1.0] * 4
        assert all_finite(ones, dtype)
        assert all_finite(np.array([0x7E, 0xFE], np.uint8), "float8_e4m3fn")  # +-448
        for b in bad[dtype]:
            assert not np.isfinite(fp8.decode(np.array([b], np.uint8), dtype)).all()
            assert not all_finite(np.array([one[dtype], b], np.uint8), dtype)


def test_safetensors_fp8_interop_with_the_official_library(tmp_path):
    e4 = fp8.encode(np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4), "float8_e4m3fn")
    e5 = fp8.encode(np.linspace(-9, 9, 10, dtype=np.float32), "float8_e5m2")
    ours = tmp_path / "ours.safetensors"
    write_safetensors(ours, {"w": (e4, "float8_e4m3fn"), "v": (e5, "float8_e5m2")})
    loaded = safetensors.torch.load_file(ours)
    assert loaded["w"].dtype == torch.float8_e4m3fn and loaded["v"].dtype == torch.float8_e5m2
    np.testing.assert_array_equal(loaded["w"].view(torch.uint8).numpy(), e4)
    np.testing.assert_array_equal(loaded["v"].view(torch.uint8).numpy(), e5)
    theirs = tmp_path / "theirs.safetensors"
    safetensors.torch.save_file(loaded, theirs)
    with SafetensorsFile(theirs) as f:
        assert {n: e.dtype for n, e in f.entries.items()} == {
            "w": "float8_e4m3fn",
            "v": "float8_e5m2",
        }
        np.testing.assert_array_equal(f.array("w"), e4)
        np.testing.assert_array_equal(f.array("v"), e5)


def test_checksums_are_of_the_bits_and_fingerprints_name_the_dtype():
    bits = np.random.default_rng(2).integers(0, 256, (512, 1024), dtype=np.uint8)  # 2 blocks
    torch_bits = to_host(torch.from_numpy(bits.copy()).view(torch.float8_e4m3fn))[0]
    assert digest(torch_bits) == digest(bits) == digest(tagged(bits, "float8_e4m3fn"))
    e4 = fingerprint([("w", "float8_e4m3fn", bits)])
    assert e4 != fingerprint([("w", "float8_e5m2", bits)]) != fingerprint([("w", "uint8", bits)])
    column = [ShardSpec(axis=1, parts=2, index=i) for i in range(2)]
    assert slice_checksums(bits, column) == tuple(digests([bits[:, :512], bits[:, 512:]]))


def test_buckets_carry_fp8_as_uint8_with_its_dtype_string():
    state = {
        "w": tagged(
            np.arange(4096, dtype=np.uint32).astype(np.uint8).reshape(64, 64), "float8_e5m2"
        ),
        "w_scale": np.ones(64, np.float32),
        "t": torch.zeros(8, 8, dtype=torch.float8_e4m3fn),
    }
    (meta, arrays), *_ = list(iter_buckets(state, 1 << 20))
    assert [(t.name, t.dtype, t.nbytes) for t in meta.tensors] == [
        ("w", "float8_e5m2", 4096),
        ("w_scale", "float32", 256),
        ("t", "float8_e4m3fn", 64),
    ]
    assert [type(a) for a in arrays] == [np.ndarray] * 3 and arrays[0].dtype == np.uint8
    assert meta.tensors[0].checksum == digest(np.asarray(state["w"]))


def test_the_fp8_preset_holds_its_linear_weights_in_fp8_with_scales():
    config = preset("tiny_fp8")
    names = quantized_names(config)
    assert "layers.0.attn.qkv.weight" in names and "layers.1.mlp.w1" in names
    assert "lm_head.weight" not in names and "embed.weight" not in names
    model = DecoderLM(config)
    params = model_parameters(model)
    assert list(params) == list(full_shapes(config))  # scales sit right after their weights
    assert {n: param_dtype(p) for n, p in params.items()} == full_dtypes(config)
    assert {n for n, d in full_dtypes(config).items() if d == "float8_e4m3fn"} == names
    assert full_shapes(config)["layers.1.mlp.w2_scale"] == (4, 64)  # [E, out]
    assert param_bytes(config) < param_bytes(preset("tiny")) / 2
    plan = shard_plan(config, ParallelConfig(tp=2, rank=1))
    assert plan["layers.0.attn.qkv.weight_scale"] == ShardSpec(axis=0, parts=2, index=1)
    assert plan["layers.0.attn.out.weight_scale"].is_replicated  # row-parallel: out is whole


def test_the_fp8_engine_computes_with_the_dequantized_weights():
    config = preset("tiny_fp8")
    state = init_full_state_dict(config, seed=5)
    assert state["layers.0.mlp.up.weight"].bits_dtype == "float8_e4m3fn"
    engine = ReferenceEngine(config)
    engine.load_full_state_dict(state)
    layer = engine.model.layers[0].mlp.up
    np.testing.assert_array_equal(read_param(layer.weight), state["layers.0.mlp.up.weight"])
    want = fp8.dequantize(
        state["layers.0.mlp.up.weight"], state["layers.0.mlp.up.weight_scale"], config.weight_dtype
    )
    np.testing.assert_array_equal(dense_weight(layer).numpy(), want)
    # The same model in float32 holding the dequantized weights computes the same logits.
    fp8_names = quantized_names(config)
    dequantized = {n: a for n, a in state.items() if n.removesuffix("_scale") not in fp8_names}
    for n in fp8_names:
        dequantized[n] = fp8.dequantize(state[n], state[f"{n}_scale"], config.weight_dtype)
    dense = ReferenceEngine(preset("tiny"))
    dense.load_full_state_dict(dequantized)
    tokens = list(b"fp8 weights")
    np.testing.assert_allclose(engine.logits(tokens), dense.logits(tokens), rtol=0, atol=1e-5)
    assert engine.generate(["fp8"], 8) == dense.generate(["fp8"], 8)
    ReferenceEngine(config, seed=5)  # seeding from the quantized state works too


def test_shared_memory_keeps_fp8_tensors_fp8_and_registrable():
    bits = fp8.encode(np.linspace(-2, 2, 32, dtype=np.float32).reshape(4, 8), "float8_e5m2")
    state = {
        "t": torch.from_numpy(bits.copy()).view(torch.float8_e5m2),
        "n": tagged(bits, "float8_e5m2"),
    }
    shared = ipc.share(state)
    try:
        assert shared["t"].dtype == torch.float8_e5m2
        assert shared["n"].bits_dtype == "float8_e5m2"
        metas = ipc.Registration(shared).tensors()
        assert [(m.name, m.dtype, m.nbytes) for m in metas] == [
            ("t", "float8_e5m2", 32),
            ("n", "float8_e5m2", 32),
        ]
        np.testing.assert_array_equal(shared["t"].view(torch.uint8).numpy(), bits)
    finally:
        shm.release()


def test_quantize_state_dict_is_what_the_fp8_preset_is_seeded_with():
    config = preset("tiny_fp8")
    dense = init_full_state_dict(preset("tiny"), seed=6)
    got = fp8.quantize_state_dict(dense, quantized_names(config), config.weight_dtype)
    want = init_full_state_dict(config, seed=6)
    assert list(got) == list(want) == list(full_shapes(config))
    for name, array in want.items():
        assert getattr(got[name], "bits_dtype", "") == getattr(array, "bits_dtype", "")
        np.testing.assert_array_equal(got[name], array)
    with pytest.raises(WeightMismatchError, match="not in the state dict"):
        fp8.quantize_state_dict(dense, {"nope.weight"}, "float8_e5m2")
