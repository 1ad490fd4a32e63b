"""Framework adapters: paddle, torch and numpy tensors as host numpy arrays, and back.

Dtypes cross frameworks as strings ("float32", "bfloat16", ...). numpy has no bfloat16, so a
bfloat16 tensor travels as a uint16 array of the same bits together with the string
"bfloat16"; every function here takes or returns that (array, dtype) pair.
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
    "int64": np.dtype("int64"),
    "int32": np.dtype("int32"),
    "int16": np.dtype("int16"),
    "int8": np.dtype("int8"),
    "uint8": np.dtype("uint8"),
    "bool": np.dtype("bool"),
}
FLOAT_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16"})


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
        return tensor, dtype_name(tensor.dtype)
    module = type(tensor).__module__
    if module.startswith("paddle"):
        return _paddle_to_host(tensor)
    if module.startswith("torch"):
        return _torch_to_host(tensor)
    raise WeightMismatchError(
        f"cannot read a {type(tensor).__name__}: expected a numpy, paddle or torch tensor"
    )


def shape_and_dtype(tensor: Any) -> tuple[tuple[int, ...], str]:
    """`tensor`'s shape and dtype string, without reading or copying its data."""
    if type(tensor).__module__.split(".")[0] not in ("numpy", "paddle", "torch"):
        raise WeightMismatchError(
            f"cannot read a {type(tensor).__name__}: expected a numpy, paddle or torch tensor"
        )
    return tuple(int(d) for d in tensor.shape), dtype_name(tensor.dtype)


def _paddle_to_host(t: Any) -> tuple[np.ndarray, str]:
    import paddle

    name = dtype_name(t.dtype)
    t = t.detach()
    if not t.place.is_cpu_place():
        t = t.cpu()
    if name == "bfloat16":
        t = t.view(paddle.uint16)
    if not t.is_contiguous():
        t = t.contiguous()
    return np.from_dlpack(t), name


def _torch_to_host(t: Any) -> tuple[np.ndarray, str]:
    import torch

    name = dtype_name(t.dtype)
    t = t.detach().cpu()
    if name == "bfloat16":
        t = t.view(torch.uint16) if hasattr(torch, "uint16") else t.view(torch.int16)
    # DLPack, not `.numpy()`: that marks the storage not resizable for good, and a trainer
    # that frees its parameters' storage between steps (FSDP) could no longer do so.
    return np.from_dlpack(t.contiguous()).view(storage_dtype(name)), name


def contiguous(array: np.ndarray) -> np.ndarray:
    """`array` in C order, copied only if it is not (unlike `np.ascontiguousarray`, a 0-d
    array stays 0-d)."""
    return np.require(array, requirements="C")


def as_storage(array: np.ndarray, dtype: str) -> np.ndarray:
    """`array` reinterpreted with the numpy dtype that stores `dtype` (checks the item size)."""
    want = storage_dtype(dtype)
    if array.dtype == want:
        return array
    if array.dtype.itemsize != want.itemsize:
        raise WeightMismatchError(f"a {array.dtype} array cannot hold {dtype} data")
    return array.view(want)


def all_finite(array: np.ndarray, dtype: str) -> bool:
    """True unless a float tensor holds NaN or Inf (bfloat16 read from its bits: an
    exponent of all ones)."""
    if dtype == "bfloat16":
        exponent = np.bitwise_and(as_storage(array, dtype), np.uint16(0x7F80))
        return not (exponent == 0x7F80).any()
    if dtype in FLOAT_DTYPES:
        return bool(np.isfinite(array).all())
    return True


def element_strides(array: np.ndarray) -> list[int]:
    """Strides in elements (the convention of paddle's and torch's `Tensor.stride()`)."""
    return [s // array.itemsize for s in array.strides]
