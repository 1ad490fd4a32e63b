"""fd_ray_sync.params on real paddle and torch CPU tensors: in-place writes, strided and
read-only sources,
bfloat16 and FP8 (bit for bit), 0-d tensors, cleared parameters.

`copy_into` is the device write (one copy into the parameter's own allocation); on this CPU
machine it runs against CPU tensors, so its logic is covered even where no GPU is.
"""

import subprocess
import sys

import numpy as np
import paddle
import pytest
import torch

from fd_ray_sync import fp8
from fd_ray_sync.errors import WeightMismatchError
from fd_ray_sync.params import (
    clear_param,
    copy_into,
    device_memory,
    empty_device_cache,
    framework,
    host_view,
    is_initialized,
    model_parameters,
    param_dtype,
    param_shape,
    param_strides,
    read_param,
    write_param,
)
from fd_ray_sync.tensors import to_host

FRAMEWORKS = ["paddle", "torch"]
DTYPES = ["float32", "bfloat16", "float8_e4m3fn", "float8_e5m2"]


def make_param(fw, shape, dtype="float32"):
    """A zero-filled parameter of `fw` (a paddle Parameter or a torch nn.Parameter)."""
    if fw == "paddle":
        init = paddle.nn.initializer.Constant(0.0)
        return paddle.create_parameter(list(shape), dtype, default_initializer=init)
    return torch.nn.Parameter(torch.zeros(shape, dtype=getattr(torch, dtype)))


def values(shape, dtype, seed=0):
    """Random values as the (storage array, dtype) pair the manager writes: bfloat16 as
    the uint16 top halves of float32s, FP8 as uint8 bits."""
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    if dtype == "bfloat16":
        return (x.view(np.uint32) >> 16).astype(np.uint16)
    if dtype in fp8.FP8_DTYPES:
        return fp8.encode(x, dtype)
    return x


def ptr(param):
    return param.data_ptr()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_write_keeps_the_data_pointer(fw, dtype):
    p = make_param(fw, (4, 3), dtype)
    before = ptr(p)
    src = values((4, 3), dtype)
    write_param(p, src, dtype)
    assert ptr(p) == before
    assert param_dtype(p) == dtype and param_shape(p) == (4, 3)
    np.testing.assert_array_equal(read_param(p), src)  # bit for bit, bfloat16 included


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("write", [write_param, copy_into], ids=["host", "device_path"])
def test_strided_sources_are_copied_as_they_are(fw, dtype, write):
    full = values((4, 6), dtype, seed=1)
    p = make_param(fw, (4, 3), dtype)
    before = ptr(p)
    column_shard = full[:, 3:]  # a TP column slice: a strided view of the full tensor
    assert not column_shard.flags.c_contiguous
    write(p, column_shard, dtype)
    assert ptr(p) == before
    np.testing.assert_array_equal(read_param(p), column_shard)
    transposed = values((3, 4), dtype, seed=2).T  # another memory order altogether
    write(p, transposed, dtype)
    np.testing.assert_array_equal(read_param(p), transposed)
    assert ptr(p) == before and param_strides(p) == (3, 1)


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("write", [write_param, copy_into], ids=["host", "device_path"])
def test_read_only_sources(fw, write):
    # Object-store buffers and safetensors mappings are read-only.
    src = values((2, 5), "float32", seed=3)
    src.flags.writeable = False
    p = make_param(fw, (2, 5))
    write(p, src, "float32")
    np.testing.assert_array_equal(read_param(p), src)


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("write", [write_param, copy_into], ids=["host", "device_path"])
def test_zero_d_tensors(fw, write):
    p = make_param(fw, ())
    before = ptr(p)
    write(p, np.asarray(np.float32(1.25)), "float32")
    assert ptr(p) == before
    assert param_shape(p) == () and param_strides(p) == ()
    view = read_param(p)
    assert view.shape == () and float(view) == 1.25


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_cleared_parameters_keep_shape_and_get_fresh_storage(fw, dtype):
    p = make_param(fw, (4, 3), dtype)
    write_param(p, values((4, 3), dtype), dtype)
    clear_param(p)
    assert not is_initialized(p) and host_view(p) is None
    assert param_shape(p) == (4, 3) and param_dtype(p) == dtype  # what the manager checks
    clear_param(p)  # twice is harmless
    src = values((4, 3), dtype, seed=4)[:, ::-1]  # strided too
    write_param(p, src, dtype)
    assert is_initialized(p)
    np.testing.assert_array_equal(read_param(p), src)


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_a_refilled_parameter_is_the_modules_own(fw):
    """The module keeps the same parameter object through a clear and a write."""
    if fw == "paddle":
        layer = paddle.nn.Linear(3, 2)
        weight, run = layer.weight, lambda x: layer(paddle.to_tensor(x)).numpy()
        w = values((3, 2), "float32", seed=5)  # paddle: [in, out]
    else:
        layer = torch.nn.Linear(3, 2)
        weight, run = layer.weight, lambda x: layer(torch.from_numpy(x)).detach().numpy()
        w = values((2, 3), "float32", seed=5)  # torch: [out, in]
    named = model_parameters(layer)
    assert named["weight"] is weight
    for tensor in named.values():
        clear_param(tensor)
    write_param(weight, w, "float32")
    write_param(named["bias"], np.zeros(2, np.float32), "float32")
    x = np.ones((1, 3), np.float32)
    expected = x @ (w if fw == "paddle" else w.T)
    np.testing.assert_allclose(run(x), expected, rtol=1e-6)


def test_torch_model_parameters_are_the_state_dict_tensors_themselves():
    class WithBuffers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.BatchNorm1d(3)  # running stats: persistent buffers
            self.register_buffer("scratch", torch.zeros(2), persistent=False)

    module = WithBuffers()
    named = model_parameters(module)
    assert list(named) == list(module.state_dict())
    assert "scratch" not in named
    assert named["norm.weight"] is module.norm.weight
    assert named["norm.running_mean"] is module.norm.running_mean


def test_torch_storage_stays_resizable():
    # Tensor.numpy() would mark it not resizable for good: a trainer could no longer free
    # its parameters' storage, and a rank could not clear them.
    t = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.bfloat16))
    to_host(t)
    read_param(t)
    write_param(t, values((4, 3), "bfloat16"), "bfloat16")
    assert t.untyped_storage().resizable()
    clear_param(t)
    assert not is_initialized(t)


def test_framework_dispatch():
    assert framework(paddle.zeros([1])) == "paddle"
    assert framework(paddle.nn.Linear(1, 1)) == "paddle"
    assert framework(torch.nn.Parameter(torch.zeros(1))) == "torch"
    assert framework(torch.nn.Linear(1, 1)) == "torch"
    with pytest.raises(WeightMismatchError, match="ndarray is neither a paddle nor a torch"):
        framework(np.zeros(1))


def test_device_cache_and_memory_on_cpu_are_no_ops():
    params = [make_param("paddle", (2,)), make_param("torch", (2,))]
    empty_device_cache(params)
    assert device_memory(params) == {}


def test_a_paddle_process_never_imports_torch():
    code = """
import sys
import numpy as np
from fd_ray_sync.config import LoadConfig, ParallelConfig
from fd_ray_sync.engine.spec import ModelConfig
from fd_ray_sync.engine.reference import ReferenceEngine, init_full_state_dict
from fd_ray_sync.manager import DynamicWeightManager

config = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16)
engine = ReferenceEngine(config)
m = DynamicWeightManager(engine, LoadConfig())
state = init_full_state_dict(config, seed=0)
m.update_from_state_dict(state, version="1")
m.clear_parameters()
m.update_parameters(__import__("fd_ray_sync.sources.memory").sources.memory.StateDictSource(state))
m.finalize_update()
m.fingerprint()
m.memory_stats()
assert "torch" not in sys.modules, "torch was imported"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
