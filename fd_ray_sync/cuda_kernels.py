"""Kernels compiled at run time: NVRTC for the device this process runs on, loaded and
launched through the CUDA driver API (`cuda.bindings`), on torch's current stream.

`load(source, name)` compiles a source once per process (and context) and returns the named
kernel; `launch(kernel, blocks, threads, *args)` passes 8-byte arguments (addresses, sizes).
Used by the batched device copy (`fd_ray_sync.cuda_copy`) and the device checksums
(`fd_ray_sync.cuda_hash`).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

_lock = threading.Lock()
failed: dict[str, str] = {}  # kernel name -> why it cannot load in this process
# (source hash, name, device) -> (module, func): a module belongs to one device's context
_loaded: dict[tuple[int, str, int], tuple[Any, Any]] = {}


def check(res, what: str):
    """The values of a cuda.bindings call's result, or RuntimeError naming `what`."""
    err, *rest = res if isinstance(res, tuple) else (res,)
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: {err}")
    return rest[0] if len(rest) == 1 else rest


def load(source: str, name: str) -> Any:
    """The kernel `name` of `source` (extern "C"), compiled for the current CUDA device once
    (launch it while that device is current)."""
    import torch

    key = (hash(source), name, torch.cuda.current_device())
    with _lock:
        if key not in _loaded:
            _loaded[key] = _compile(source, name)
        return _loaded[key][1]


def available(source: str, name: str, instead: str, log=None) -> bool:
    """Whether kernel `name` loads in this process (tried once; if not, one warning on `log`
    saying what is done `instead`)."""
    if name in failed:
        return False
    try:
        load(source, name)
    except Exception as e:  # noqa: BLE001 - ImportError, NVRTC or driver errors alike
        failed[name] = f"{type(e).__name__}: {e}"
        (log or logging.getLogger(__name__)).warning(
            "kernel %s unavailable, %s (install cuda-bindings: pip install 'fd-ray-sync[gpu]'): %s",
            name,
            instead,
            failed[name],
        )
        return False
    return True


def _compile(source: str, name: str) -> tuple[Any, Any]:
    import torch
    from cuda.bindings import driver, nvrtc

    major, minor = torch.cuda.get_device_capability()
    prog = check(
        nvrtc.nvrtcCreateProgram(source.encode(), f"{name}.cu".encode(), 0, [], []), "nvrtc"
    )
    opts = [f"--gpu-architecture=sm_{major}{minor}".encode(), b"-std=c++17"]
    res = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    if int(res[0]) != 0:
        size = check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtc log size")
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        raise RuntimeError(f"NVRTC could not compile {name}: {log.decode()}")
    size = check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
    cubin = b" " * size
    check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
    image = np.frombuffer(cubin, dtype=np.uint8)
    torch.cuda.current_stream().synchronize()  # the runtime's primary context is current
    module = check(driver.cuModuleLoadData(image.ctypes.data), "cuModuleLoadData")
    func = check(driver.cuModuleGetFunction(module, name.encode()), "cuModuleGetFunction")
    return module, func


def launch(func: Any, blocks: int, threads: int, *args: int) -> None:
    """Queue `func<<<blocks, threads>>>(*args)` on torch's current stream."""
    import torch
    from cuda.bindings import driver

    # kernelParams: the address of an array holding the address of each (8-byte) argument;
    # the driver reads them during the call (a graph capture copies them too).
    values = np.array(args, dtype=np.uint64)
    params = np.array([values.ctypes.data + 8 * i for i in range(len(args))], dtype=np.uint64)
    stream = driver.CUstream(torch.cuda.current_stream().cuda_stream)
    check(
        driver.cuLaunchKernel(func, blocks, 1, 1, threads, 1, 1, 0, stream, params.ctypes.data, 0),
        "cuLaunchKernel",
    )
