"""Reading and writing paddle parameters in place, framework-neutrally through DLPack."""

from __future__ import annotations

from typing import Any

import numpy as np

from fd_ray_sync.tensors import as_storage, contiguous, dtype_name, to_host


def param_dtype(param: Any) -> str:
    return dtype_name(param.dtype)


def param_shape(param: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in param.shape)


def host_view(param: Any) -> np.ndarray | None:
    """A writable numpy view of a CPU parameter's storage (bfloat16 as uint16); None otherwise."""
    import paddle

    if not param._is_initialized() or not param.place.is_cpu_place():
        return None
    t = param.detach()
    if param_dtype(param) == "bfloat16":
        t = t.view(paddle.uint16)
    return np.from_dlpack(t)


def read_param(param: Any) -> np.ndarray:
    """The parameter's values on the host (a view for CPU parameters, a copy from devices)."""
    view = host_view(param)
    if view is not None:
        return view
    return to_host(param)[0]


def write_param(param: Any, array: np.ndarray, dtype: str) -> None:
    """Copy `array` (already checked for shape and dtype) into `param`.

    A parameter that holds storage is written in place, so anything sharing its buffer sees
    the new values. A cleared parameter gets fresh storage of its own: the source buffer is
    never shared, because it may be a read-only mapping or an object-store buffer that goes
    away after the update.
    """
    import paddle

    src = as_storage(array, dtype)
    view = host_view(param)
    if view is not None:
        np.copyto(view, src, casting="no")
        return
    fresh = paddle.to_tensor(contiguous(src))  # a copy, on the default device
    if dtype == "bfloat16":
        fresh = fresh.view(paddle.bfloat16)
    if param._is_initialized():
        paddle.assign(fresh, output=param)
    else:
        fresh._share_buffer_to(param)
