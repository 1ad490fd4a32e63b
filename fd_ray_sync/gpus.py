"""Which GPUs a rank process sees.

Ray gives each GPU actor only its own GPU (it sets `CUDA_VISIBLE_DEVICES` to the GPU it
assigned). That isolates ranks, but a rank then cannot map memory on another GPU of its
node, and the ipc transport needs exactly that when one trainer process feeds a TP replica
whose ranks sit on several GPUs: rank k reads its slice of the trainer's tensors on GPU 0
over NVLink/PCIe peer access (`fd_ray_sync.cuda_ipc`).

`FleetConfig(gpu_visibility="node")` starts the ranks with Ray's
`RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1`, and each rank then sets the variable itself
(`see_node_gpus`, first thing in the rank actor, before CUDA starts in the process): its own
GPU first, so `cuda:0` (torch) and `gpu:0` (paddle, NCCL) stay its own GPU on every thread,
then the node's other GPUs, which it can reach as peers. The same runs when a cluster sets
Ray's variable for every worker: without it every rank would take GPU 0.
"""

from __future__ import annotations

import os

from fd_ray_sync.errors import StateError

NOSET = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


def own_first(own: str, visible: str | None, node_gpus: int) -> str:
    """`CUDA_VISIBLE_DEVICES` for a process whose GPU is `own` (an id Ray assigned) on a node
    whose GPUs are `visible` (the variable the node's raylet started with) or, when that is
    unset, the `node_gpus` devices 0..node_gpus-1: `own` first, the others in order."""
    node = (
        [g.strip() for g in visible.split(",")] if visible else [str(i) for i in range(node_gpus)]
    )
    if own not in node:
        raise StateError(
            f"Ray assigned GPU {own!r}, which is not one of this node's GPUs {node}: cannot "
            "make it this rank's device"
        )
    return ",".join([own, *(g for g in node if g != own)])


def _refuse_if_cuda_started() -> None:
    """CUDA reads the variable once, when it starts: after that, setting it does nothing and
    this rank would take the node's GPU 0."""
    import sys

    torch = sys.modules.get("torch")
    paddle = sys.modules.get("paddle")
    started = (torch is not None and torch.cuda.is_initialized()) or (
        paddle is not None and paddle.is_compiled_with_cuda()  # its import starts CUDA
    )
    if started:
        raise StateError(
            "CUDA started in this rank process before it could choose its GPU (a module "
            "imported at unpickling time initialized it: import paddle, or a torch.cuda call, "
            "at the top of the engine factory's module); import them inside the factory"
        )


def see_node_gpus() -> None:
    """In a GPU rank started with Ray's NOSET variable: let this process see every GPU of its
    node, its own as device 0. Must run before anything in the process initializes CUDA."""
    if os.environ.get(NOSET, "").strip().lower() not in ("1", "true"):
        return
    _refuse_if_cuda_started()
    import ray

    ids = [str(i) for i in ray.get_gpu_ids()]
    if not ids:
        return  # a CPU rank
    if len(ids) != 1:
        raise StateError(f"a rank holds one GPU, Ray assigned {ids}")
    node_id = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    node_gpus = int(node["Resources"].get("GPU", 0))
    os.environ["CUDA_VISIBLE_DEVICES"] = own_first(
        ids[0], os.environ.get("CUDA_VISIBLE_DEVICES"), node_gpus
    )
