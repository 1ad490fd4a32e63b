"""Framework adapters: paddle, torch and numpy tensors as host numpy arrays, and back.

Dtypes cross frameworks as strings ("float32", "bfloat16", ...). numpy has no bfloat16 and no
FP8, so such a tensor travels as an unsigned integer array of the same bits together with its
dtype string; every function here takes or returns that (array, dtype) pair:

    bfloat16                      uint16 bits
    float8_e4m3fn, float8_e5m2    uint8 bits   (safetensors F8_E4M3 / F8_E5M2)

A numpy trainer hands such bits over as `tagged(bits, "float8_e4m3fn")`: an ndarray that
remembers its dtype string through slicing (torch and paddle tensors carry their own dtype).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fd_ray_sync.errors import WeightMismatchError

# dtype string -> numpy dtype that stores its bits.
_STORAGE: dict[str, np.dtype] = {
    "float64": np.dtype("float64"),
    "float32": np.dtype("float32"),
    "float16": np.dtype("float16"),
    "bfloat16": np.dtype("uint16"),
    "float8_e4m3fn": np.dtype("uint8"),
    "float8_e5m2": np.dtype("uint8"),
    "int64": np.dtype("int64"),
    "int32": np.dtype("int32"),
    "int16": np.dtype("int16"),
    "int8": np.dtype("int8"),
    "uint8": np.dtype("uint8"),
    "bool": np.dtype("bool"),
}
FLOAT_DTYPES = frozenset(
    {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}
)
# Dtypes numpy lacks: their arrays are the bits, in the unsigned dtype `_STORAGE` names.
BITS_DTYPES = frozenset({"bfloat16", "float8_e4m3fn", "float8_e5m2"})
# NaN/Inf test on the bits: (mask, value) such that `bits & mask == value` is not finite.
# e4m3fn has no Inf; its NaN is S.1111.111. bfloat16 and e5m2 are IEEE-like: exponent all ones.
_NOT_FINITE = {
    "bfloat16": (0x7F80, 0x7F80),
    "float8_e4m3fn": (0x7F, 0x7F),
    "float8_e5m2": (0x7C, 0x7C),
}


class TaggedBits(np.ndarray):
    """The bits of a tensor of a dtype numpy lacks, with its dtype string in `bits_dtype`;
    views and slices keep the tag. Arithmetic on it is arithmetic on bits, not values."""

    bits_dtype: str

    def __array_finalize__(self, obj) -> None:
        self.bits_dtype = getattr(obj, "bits_dtype", "")


def tagged(bits: np.ndarray, dtype: str) -> TaggedBits:
    """`bits` (the storage dtype of `dtype`, e.g. uint8 for FP8) tagged with `dtype`; no copy."""
    if dtype not in BITS_DTYPES:
        raise WeightMismatchError(
            f"{dtype!r} needs no tag; tagged bits are for {', '.join(sorted(BITS_DTYPES))}"
        )
    out = as_storage(np.asarray(bits), dtype).view(TaggedBits)
    out.bits_dtype = dtype
    return out


def known_dtypes() -> list[str]:
    return sorted(_STORAGE)


def storage_dtype(dtype: str) -> np.dtype:
    """The numpy dtype holding `dtype`'s bits."""
    try:
        return _STORAGE[dtype]
    except KeyError:
        raise WeightMismatchError(
            f"unsupported dtype {dtype!r}; known: {', '.join(known_dtypes())}"
        ) from None


def dtype_name(dtype: Any) -> str:
    """Canonical string of a paddle, torch or numpy dtype ("paddle.float32" -> "float32")."""
    name = str(dtype).rsplit(".", 1)[-1]
    name = {"bf16": "bfloat16", "float": "float32", "half": "float16", "double": "float64"}.get(
        name, name
    )
    storage_dtype(name)
    return name


def to_host(tensor: Any) -> tuple[np.ndarray, str]:
    """A numpy array (zero-copy where the framework allows) and the dtype string of `tensor`.

    Accepts numpy arrays, paddle tensors and torch tensors (on any device; device tensors are
    copied to host).
    """
    if isinstance(tensor, np.ndarray):
        dtype = getattr(tensor, "bits_dtype", "") or dtype_name(tensor.dtype)
        plain = tensor if type(tensor) is np.ndarray else tensor.view(np.ndarray)  # untagged
        return as_storage(plain, dtype), dtype
    module = type(tensor).__module__
    if module.startswith("paddle"):
        return _paddle_to_host(tensor)
    if module.startswith("torch"):
        return _torch_to_host(tensor)
    raise WeightMismatchError(
        f"cannot read a {type(tensor).__name__}: expected a numpy, paddle or torch tensor"
    )


def on_cuda(tensor: Any) -> bool:
    """Whether `tensor` is a torch tensor in CUDA memory."""
    return type(tensor).__module__.startswith("torch") and tensor.device.type == "cuda"


def shape_and_dtype(tensor: Any) -> tuple[tuple[int, ...], str]:
    """`tensor`'s shape and dtype string, without reading or copying its data."""
    if isinstance(tensor, TaggedBits):
        return tuple(int(d) for d in tensor.shape), tensor.bits_dtype
    if type(tensor).__module__.split(".")[0] not in ("numpy", "paddle", "torch"):
        raise WeightMismatchError(
            f"cannot read a {type(tensor).__name__}: expected a numpy, paddle or torch tensor"
        )
    return tuple(int(d) for d in tensor.shape), dtype_name(tensor.dtype)


def _paddle_to_host(t: Any) -> tuple[np.ndarray, str]:
    name = dtype_name(t.dtype)
    t = t.detach()
    if not t.place.is_cpu_place():
        t = t.cpu()
    t = as_bits(t, name)
    if not t.is_contiguous():
        t = t.contiguous()
    return np.from_dlpack(t), name


def _torch_to_host(t: Any) -> tuple[np.ndarray, str]:
    name = dtype_name(t.dtype)
    t = as_bits(t.detach().cpu(), name)
    # DLPack, not `.numpy()`: that marks the storage not resizable for good, and a trainer
    # that frees its parameters' storage between steps (FSDP) could no longer do so.
    return np.from_dlpack(t.contiguous()).view(storage_dtype(name)), name


def as_bits(t: Any, dtype: str) -> Any:
    """A paddle or torch tensor of a dtype numpy lacks viewed as its unsigned bits (DLPack
    carries neither FP8, nor bfloat16 to numpy); any other tensor as it is. No copy."""
    if dtype not in BITS_DTYPES:
        return t
    module = _framework_module(t)
    name = storage_dtype(dtype).name  # "uint8", "uint16"
    if not hasattr(module, name):  # torch before 2.3 has no uint16
        name = name.replace("uint", "int")
    return t.view(getattr(module, name))


def from_bits(t: Any, dtype: str) -> Any:
    """The inverse of `as_bits`: a paddle or torch tensor of bits viewed as `dtype`."""
    if dtype not in BITS_DTYPES:
        return t
    return t.view(getattr(_framework_module(t), dtype))


def _framework_module(t: Any) -> Any:
    import importlib

    return importlib.import_module(type(t).__module__.split(".", 1)[0])


def contiguous(array: np.ndarray) -> np.ndarray:
    """`array` in C order, copied only if it is not (unlike `np.ascontiguousarray`, a 0-d
    array stays 0-d)."""
    return np.require(array, requirements="C")


def as_storage(array: np.ndarray, dtype: str) -> np.ndarray:
    """`array` reinterpreted with the numpy dtype that stores `dtype` (checks the item size).
    A framework tensor (a device source's view) is returned as it is: it carries its dtype."""
    if not isinstance(array, np.ndarray):
        return array
    want = storage_dtype(dtype)
    if array.dtype == want:
        return array
    if array.dtype.itemsize != want.itemsize:
        raise WeightMismatchError(f"a {array.dtype} array cannot hold {dtype} data")
    return array.view(want)


def host_array(array: Any, dtype: str) -> np.ndarray:
    """A chunk's array as host storage: a numpy array reinterpreted (no copy), a framework
    tensor (a device source's view: ipc over CUDA) read to the host."""
    if isinstance(array, np.ndarray):
        return as_storage(array, dtype)
    return to_host(array)[0]


def all_finite(array: Any, dtype: str) -> bool:
    """True unless a float tensor holds NaN or Inf (bfloat16 and FP8 read from their bits)."""
    array = host_array(array, dtype)
    if dtype in _NOT_FINITE:
        bits = as_storage(array, dtype)
        mask, value = (bits.dtype.type(v) for v in _NOT_FINITE[dtype])
        return not (np.bitwise_and(bits, mask) == value).any()
    if dtype in FLOAT_DTYPES:
        return bool(np.isfinite(array).all())
    return True


def element_strides(array: Any) -> list[int]:
    """Strides in elements (the convention of paddle's and torch's `Tensor.stride()`) of a
    numpy array or a framework tensor."""
    if not isinstance(array, np.ndarray):
        return [int(s) for s in array.stride()]
    return [s // array.itemsize for s in array.strides]
