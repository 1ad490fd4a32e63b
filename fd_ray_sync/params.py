"""Every operation the weight manager does on a parameter, for paddle and torch tensors alike.

The manager never touches a framework's API: it asks this module for a parameter's dtype,
shape, strides and state, and to clear, read and write it. Each call dispatches on the
tensor's framework (its class's module); torch is imported only once a torch tensor or module
is seen, so a paddle-only process never imports it.

Writes are in place: a parameter that holds storage keeps its allocation (a CUDA graph or
anything else holding its pointer stays valid).

    CPU parameter     numpy view of its storage (DLPack, no copy)  <- np.copyto(view, source)
                      (a strided source is copied element by element, never made contiguous)
    device parameter  source wrapped as a host tensor (DLPack, no copy) -> one host-to-device
                      copy_ into the parameter's own allocation; a torch device source (ipc
                      over CUDA: a view of the trainer's memory) -> one device-to-device copy_
    cleared           fresh storage of its own (never the source's buffer, which may be a
                      read-only mapping or an object-store buffer that goes away)

Sleeping at level 1 (`offload_param`, `reload_param`) keeps a host copy apart from the
parameter: an owned numpy array for a CPU parameter, pinned host memory for a device one; the
storage is then freed like a clear, and wake gives the cleared parameter fresh storage.

bfloat16 crosses as uint16 storage on the numpy side, float8_e4m3fn and float8_e5m2 as uint8
(see fd_ray_sync.tensors): views of the parameter's bits, written bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

from fd_ray_sync.errors import StateError, WeightMismatchError
from fd_ray_sync.tensors import (
    as_bits,
    as_storage,
    contiguous,
    dtype_name,
    from_bits,
    on_cuda,
    to_host,
)


class _Paddle:
    """Paddle Tensors and Parameters (`paddle.base.framework.EagerParamBase`)."""

    @staticmethod
    def is_initialized(t: Any) -> bool:
        return t._is_initialized()

    @staticmethod
    def strides(t: Any) -> tuple[int, ...]:
        return tuple(int(s) for s in t.stride())

    @staticmethod
    def clear(t: Any) -> None:
        t._clear_data()

    @staticmethod
    def host_view(t: Any, dtype: str) -> np.ndarray | None:
        if not t._is_initialized() or not t.place.is_cpu_place():
            return None
        return np.from_dlpack(as_bits(t.detach(), dtype))

    @staticmethod
    def copy_into(t: Any, src: Any, dtype: str) -> None:
        import paddle

        # A zero-copy tensor over the source (read-only buffers included; a torch device
        # tensor through DLPack, as its bits); made contiguous first because paddle's
        # cross-device copy_ of a strided source is unverified (on CPU it copies strided
        # sources correctly).
        if isinstance(src, np.ndarray):
            bits = _paddle_viewable(contiguous(src), dtype)
        else:
            bits = as_bits(src.detach().contiguous(), dtype)
            if dtype == "bfloat16":
                import torch

                bits = bits.view(torch.int16)  # see _paddle_viewable
        host = from_bits(paddle.utils.dlpack.from_dlpack(bits), dtype)
        t.copy_(host, True)  # into t's own allocation, on t's place: one copy
        if on_cuda(src):
            # The source is the trainer's memory: the copy must be done before the rank tells
            # the trainer it may write there again (torch's stream waits cover torch copies).
            paddle.device.synchronize(t.place)

    @staticmethod
    def refill(t: Any, src: np.ndarray, dtype: str) -> None:
        import paddle

        fresh = paddle.to_tensor(_paddle_viewable(contiguous(src), dtype))  # default device
        fresh = from_bits(fresh, dtype)
        fresh._share_buffer_to(t)

    @staticmethod
    def offload(t: Any, dtype: str) -> Any:
        view = _Paddle.host_view(t, dtype)
        if view is not None:
            return np.array(view, copy=True)
        # Page-locked host memory: the copy back on wake is one DMA, no staging buffer.
        return _Pinned(t.pin_memory(), t.place)

    @staticmethod
    def reload(t: Any, copy: Any, dtype: str) -> None:
        if isinstance(copy, np.ndarray):
            _Paddle.refill(t, copy, dtype)
        else:
            copy.tensor._copy_to(copy.place, True)._share_buffer_to(t)

    @staticmethod
    def data_ptr(t: Any) -> int:
        return t.data_ptr()

    @staticmethod
    def empty_cache() -> None:
        import paddle

        if paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
            paddle.device.cuda.empty_cache()

    @staticmethod
    def memory() -> tuple[int, int, int] | None:
        import paddle

        if not paddle.is_compiled_with_cuda():
            return None
        cuda = paddle.device.cuda
        return cuda.memory_allocated(), cuda.memory_reserved(), cuda.max_memory_allocated()

    @staticmethod
    def state_dict(model: Any) -> dict[str, Any]:
        return dict(model.state_dict())  # the parameters and persistable buffers themselves


class _Pinned(NamedTuple):
    """A paddle device parameter's values in page-locked host memory, and where they go back."""

    tensor: Any
    place: Any


def _paddle_viewable(src: np.ndarray, dtype: str) -> np.ndarray:
    """bfloat16 bits as int16: paddle views int16 as bfloat16 but has no such kernel for
    uint16 (uint8 views as FP8 fine)."""
    return src.view(np.int16) if dtype == "bfloat16" else src


def wide_pair(dst: Any, src: Any) -> tuple[Any, Any]:
    """``dst`` and a strided ``src`` of the same shape reinterpreted as the widest integer
    elements both layouts allow (int64, then int32), so that the copy kernel moves 4x (2x)
    fewer elements with the bits unchanged; a contiguous pair is returned as it is (it is one
    memcpy either way). Measured on an H200: the column-split half of the gpucheck model copied
    in 12.4 ms as bfloat16, 6.7 ms as int64."""
    import torch

    if src.is_contiguous() or dst.dim() < 2 or tuple(dst.shape) != tuple(src.shape):
        return dst, src
    for dt in (torch.int64, torch.int32):
        try:
            return dst.view(dt), src.view(dt)
        except RuntimeError:  # last dim not a multiple of the width, or an unaligned offset
            continue
    return dst, src


class _Torch:
    """torch Tensors, Parameters and buffers.

    Clearing frees the storage's bytes (`untyped_storage().resize_(0)`, as FSDP does) but
    keeps the tensor, its shape and its storage object, so the module still holds the same
    Parameter; a write into a cleared tensor grows the storage back. Storage shared with
    numpy through `Tensor.numpy()` is no longer resizable, so views here use DLPack.
    """

    @staticmethod
    def is_initialized(t: Any) -> bool:
        return t.untyped_storage().nbytes() > 0

    @staticmethod
    def strides(t: Any) -> tuple[int, ...]:
        return tuple(int(s) for s in t.stride())

    @staticmethod
    def clear(t: Any) -> None:
        storage = t.untyped_storage()
        if not storage.resizable():
            raise StateError(
                "cannot free a torch tensor whose storage is not resizable (shared with numpy "
                "through .numpy() or built from a foreign buffer)"
            )
        storage.resize_(0)

    @staticmethod
    def host_view(t: Any, dtype: str) -> np.ndarray | None:
        if t.device.type != "cpu" or not _Torch.is_initialized(t):
            return None
        return np.from_dlpack(as_bits(t.detach(), dtype))  # valid until the tensor is cleared

    @staticmethod
    def copy_into(t: Any, src: Any, dtype: str) -> None:
        import torch

        if isinstance(src, np.ndarray):
            src = from_bits(torch.from_dlpack(src), dtype)  # zero-copy, strides kept
        elif src.dtype != t.dtype:  # the bits of t's dtype (checked by the manifest)
            src = src.view(t.dtype)
        dst, src = wide_pair(t.detach(), src)  # a strided slice: fewer, wider elements
        with torch.no_grad():
            dst.copy_(src)  # one copy, from the (strided) source into t's storage

    @staticmethod
    def _grow(t: Any) -> None:
        """Give a cleared tensor its storage's bytes back (uninitialized)."""
        extent = sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1
        t.untyped_storage().resize_((t.storage_offset() + extent) * t.element_size())

    @staticmethod
    def refill(t: Any, src: np.ndarray, dtype: str) -> None:
        _Torch._grow(t)
        view = _Torch.host_view(t, dtype)
        if view is not None:
            np.copyto(view, src, casting="no")
        else:
            _Torch.copy_into(t, src, dtype)

    @staticmethod
    def offload(t: Any, dtype: str) -> Any:
        view = _Torch.host_view(t, dtype)
        if view is not None:
            return np.array(view, copy=True)
        import torch

        pinned = torch.empty_strided(
            t.shape, t.stride(), dtype=t.dtype, device="cpu", pin_memory=True
        )
        pinned.copy_(t.detach())
        return pinned

    @staticmethod
    def reload(t: Any, copy: Any, dtype: str) -> None:
        if isinstance(copy, np.ndarray):
            _Torch.refill(t, copy, dtype)
            return
        import torch

        _Torch._grow(t)  # the same storage object, on t's device: its pointer comes back new
        with torch.no_grad():
            t.detach().copy_(copy)

    @staticmethod
    def data_ptr(t: Any) -> int:
        return t.data_ptr()

    @staticmethod
    def empty_cache() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @staticmethod
    def memory() -> tuple[int, int, int] | None:
        import torch

        if not torch.cuda.is_available():
            return None
        cuda = torch.cuda
        return cuda.memory_allocated(), cuda.memory_reserved(), cuda.max_memory_allocated()

    @staticmethod
    def state_dict(model: Any) -> dict[str, Any]:
        # keep_vars: the Parameters and persistent buffers themselves, not detached aliases.
        return dict(model.state_dict(keep_vars=True))


_ADAPTERS = {"paddle": _Paddle, "torch": _Torch}


def framework(obj: Any) -> str:
    """The framework ("paddle" or "torch") of a tensor or model; subclasses count."""
    for cls in type(obj).__mro__:
        root = cls.__module__.split(".", 1)[0]
        if root in _ADAPTERS:
            return root
    raise WeightMismatchError(
        f"a {type(obj).__name__} is neither a paddle nor a torch tensor or model"
    )


def _adapter(obj: Any):
    return _ADAPTERS[framework(obj)]


def model_parameters(model: Any) -> dict[str, Any]:
    """A paddle Layer's or torch Module's parameters and persistent buffers by state-dict
    name (the tensors themselves, so writes reach the model)."""
    return _adapter(model).state_dict(model)


def param_dtype(param: Any) -> str:
    return dtype_name(param.dtype)


def param_shape(param: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in param.shape)


def is_initialized(param: Any) -> bool:
    """Whether the parameter holds storage (False once cleared)."""
    return _adapter(param).is_initialized(param)


def param_strides(param: Any) -> tuple[int, ...]:
    """Strides in elements."""
    return _adapter(param).strides(param)


def clear_param(param: Any) -> None:
    """Free the parameter's storage, keeping the parameter object, its shape and dtype."""
    _adapter(param).clear(param)


def host_view(param: Any) -> np.ndarray | None:
    """A writable numpy view of a CPU parameter's storage (bfloat16 as uint16); None for
    device and cleared parameters."""
    return _adapter(param).host_view(param, param_dtype(param))


def read_param(param: Any) -> np.ndarray:
    """The parameter's values on the host (a view for CPU parameters, a copy from devices)."""
    view = host_view(param)
    if view is not None:
        return view
    return to_host(param)[0]


def param_digests(params: Sequence[Any]) -> list[int]:
    """`checksum.digest` of each parameter's values: torch CUDA parameters on their device, in
    one launch (`fd_ray_sync.cuda_hash`), the others from their host bytes (one at a time:
    a device parameter of another framework is read to the host for it)."""
    from fd_ray_sync import cuda_hash
    from fd_ray_sync.checksum import digest

    device = [i for i, p in enumerate(params) if on_cuda(p)]
    out: list[int | None] = [None] * len(params)
    for i, value in zip(device, cuda_hash.digests([params[i].detach() for i in device])):
        out[i] = value
    return [digest(read_param(p)) if v is None else v for p, v in zip(params, out)]


def write_param(param: Any, array: Any, dtype: str) -> None:
    """Copy `array` (already checked for shape and dtype) into `param`, in place.

    A parameter that holds storage keeps it (the same data pointer before and after); a
    cleared parameter gets fresh storage of its own. `array` is a numpy array, or a torch
    tensor on a device (the ipc transport over CUDA: a view of the trainer's memory), which
    a device parameter takes with one device-to-device copy.
    """
    adapter = _adapter(param)
    view = adapter.host_view(param, dtype)
    if not isinstance(array, np.ndarray):
        if view is None and adapter.is_initialized(param):
            copy_into(param, array, dtype)
            return
        array = to_host(array)[0]  # a host or cleared parameter: through the host
    src = as_storage(array, dtype)
    if view is not None:
        np.copyto(view, src, casting="no")
    elif not adapter.is_initialized(param):
        adapter.refill(param, src, dtype)
    else:
        copy_into(param, src, dtype)


def copy_into(param: Any, src: Any, dtype: str) -> None:
    """The device write of `write_param` (works on CPU too): one copy from the source (a
    host array, or a torch tensor on any device) into the initialized parameter's own
    allocation; raises if the framework reallocated."""
    adapter = _adapter(param)
    before = adapter.data_ptr(param)
    if isinstance(src, np.ndarray):
        src = as_storage(src, dtype)
    elif framework(src) != "torch":
        raise WeightMismatchError(f"cannot copy from a {type(src).__name__} into a parameter")
    adapter.copy_into(param, src, dtype)
    if adapter.data_ptr(param) != before and math.prod(param_shape(param)):
        raise StateError(
            f"writing a {framework(param)} {dtype} parameter of shape {param_shape(param)} "
            "moved its storage; anything holding its pointer (CUDA graphs) is now stale"
        )


def offload_param(param: Any) -> Any:
    """A copy of the parameter's values in host memory of this process, kept apart from its
    storage (which the caller may then free): an owned numpy array for a CPU parameter,
    page-locked (pinned) host memory of the framework for a device one. `reload_param` puts
    it back."""
    return _adapter(param).offload(param, param_dtype(param))


def reload_param(param: Any, copy: Any) -> None:
    """Give a cleared parameter fresh storage (on its own device) holding `copy`, what
    `offload_param` took from it."""
    if is_initialized(param):
        raise StateError(f"reload_param into a {framework(param)} parameter that holds storage")
    _adapter(param).reload(param, copy, param_dtype(param))


def empty_device_cache(params: Iterable[Any]) -> None:
    """Hand the device allocators' free blocks back (FastDeploy does this after clearing and
    reloading), for each framework `params` belong to; nothing to do on CPU."""
    for name in sorted({framework(p) for p in params}):
        _ADAPTERS[name].empty_cache()


def device_memory(params: Iterable[Any]) -> dict[str, float]:
    """The device allocators' figures (GiB) of the frameworks `params` belong to, summed;
    empty where none has a device."""
    figures = [
        m for name in sorted({framework(p) for p in params}) if (m := _ADAPTERS[name].memory())
    ]
    if not figures:
        return {}
    allocated, reserved, peak = (sum(f[i] for f in figures) / 2**30 for i in range(3))
    return {
        "gpu_allocated_gb": allocated,
        "gpu_reserved_gb": reserved,
        "gpu_max_allocated_gb": peak,
    }
