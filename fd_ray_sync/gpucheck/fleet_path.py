"""The fleet's own ipc path on one GPU, without Ray: ``python -m fd_ray_sync.gpucheck.fleet_path``.

The check next door (``python -m fd_ray_sync.gpucheck``) measures the protocol with minimal
processes of its own. This one runs the classes a Ray fleet runs on a GPU node, minus Ray:

    trainer process   its weights on the GPU; `fd_ray_sync.ipc.Registration` (registered
                      storage) and a device `BucketRing` (bucket ring), shared by CUDA IPC
                      (`fd_ray_sync.cuda_ipc`)
    this process      two TP ranks, each a `DynamicWeightManager` over a `TorchEngine` whose
                      module holds its slices on the GPU, loading through `IpcStorageSource` /
                      `IpcRingSource`; the ring's feed is the coordinator's `BucketFeed`,
                      served by threads here instead of Ray calls

Each method runs checked (every slice hashed by the trainer and by the rank that wrote it,
compared per tensor) and unchecked. Printed per method: best seconds of `--rounds` updates,
GB/s of bytes written by both ranks, ratio to one device copy of as many bytes (the floor,
measured in the same run), bit-identical, and whether every parameter kept its pointer.
Needs torch with CUDA, cuda.bindings, numpy, pydantic and xxhash; not Ray, not paddle.

`--device cpu` runs the same script over shared memory (registered tensors put there by
`fd_ray_sync.ipc.share`): the test suite checks the script itself that way on CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

TP = 2
TIMEOUT_S = 120.0


def names_and_shapes(layers: int, dim: int) -> dict[str, tuple[tuple[int, ...], str, int | None]]:
    """name -> (full shape, dtype, TP split axis or None): per layer a column-split and a
    row-split bf16 matrix (strided and contiguous slices) and a replicated fp32 vector."""
    out = {}
    for i in range(layers):
        out[f"layers.{i}.col"] = ((dim, dim), "bfloat16", 1)
        out[f"layers.{i}.row"] = ((dim, dim), "bfloat16", 0)
        out[f"layers.{i}.norm"] = ((dim,), "float32", None)
    return out


def fill(t: torch.Tensor, name: str, step: int) -> None:
    """Deterministic values of `name` at trainer step `step`, computed on t's device."""
    salt = (sum(name.encode()) * 131 + step * 7919) % 65521
    idx = torch.arange(t.numel(), device=t.device, dtype=torch.int64)
    vals = ((idx * 2654435761 + salt) % 65521).to(torch.float32) / 65521.0 - 0.5
    t.copy_(vals.view(t.shape))


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize(device)


def _trainer(inbox, outbox, layers: int, dim: int, slot_bytes: int, device: str) -> None:
    """The trainer process: weights on `device`, shared both ways; answers the parent."""
    from fd_ray_sync.ipc import BucketRing, Registration, share
    from fd_ray_sync.sharding import ShardSpec

    shapes = names_and_shapes(layers, dim)
    weights = {
        n: torch.empty(s, dtype=getattr(torch, d), device=device) for n, (s, d, _) in shapes.items()
    }
    if device == "cpu":
        weights = share(weights)  # registered storage on CPU lives in shared memory
    plans = [
        {
            n: ShardSpec(axis=a, parts=TP, index=r)
            for n, (_, _, a) in shapes.items()
            if a is not None
        }
        for r in range(TP)
    ]
    reg = Registration(weights)
    ring = BucketRing(2, slot_bytes, device=None if device == "cpu" else device)
    outbox.put(("ready", {"ring": ring.names, "offsets": ring.offsets}))
    while True:
        cmd, step, checked = inbox.get()
        if cmd == "stop":
            return
        for n, t in weights.items():
            fill(t, n, step)
        _sync(device)
        outbox.put(("filled",))
        if inbox.get() != ("go",):
            return
        use = plans if checked else None
        if cmd == "registered":
            metas = reg.tensors(use)
            outbox.put(
                ("spec", [m.model_dump() for m in metas], [reg.segment_of(m.name) for m in metas])
            )
        else:  # the ring: bucket i waits until both ranks wrote bucket i - 2 (same slot)
            parts = ring.plan(weights)
            for i, names in enumerate(parts):
                if i >= len(ring):
                    outbox.put(("wait", i - len(ring)))
                    if inbox.get() != ("ok",):
                        return
                meta = ring.pack(i, [(n, weights[n]) for n in names], use)
                outbox.put(("bucket", meta.model_dump(), i % len(ring)))
            outbox.put(("end", len(parts)))
        if inbox.get() != ("next",):
            return


class _Remote:
    def __init__(self, fn):
        self.remote = fn


class _LocalFeed:
    """What a ring source asks of the coordinator, served by a `BucketFeed` in threads."""

    def __init__(self, feed, pool):
        self.take_bucket = _Remote(
            lambda uid, rank, i, done: pool.submit(feed.take, rank, i, done, TIMEOUT_S)
        )


def _ring_source_class():
    from fd_ray_sync.sources.ipc import IpcRingSource

    class LocalRingSource(IpcRingSource):
        def _get(self, pending):
            return pending.result()

        def _arrived(self, pending):
            return pending.done()

    return LocalRingSource


def _ranks(layers: int, dim: int, checked: bool, device: str, copies: str) -> list:
    from fd_ray_sync.config import LoadConfig, ParallelConfig
    from fd_ray_sync.engine.torch_engine import TorchEngine
    from fd_ray_sync.manager import DynamicWeightManager
    from fd_ray_sync.sharding import REPLICATED, ShardSpec, local_shape_of

    shapes = names_and_shapes(layers, dim)
    managers = []
    for r in range(TP):
        plan = {
            n: ShardSpec(axis=a, parts=TP, index=r)
            for n, (_, _, a) in shapes.items()
            if a is not None
        }
        module = torch.nn.Module()
        module.layers = torch.nn.ModuleList()
        for i in range(layers):
            layer = torch.nn.Module()
            for part in ("col", "row", "norm"):
                name = f"layers.{i}.{part}"
                shape, dtype, _ = shapes[name]
                local = local_shape_of(name, plan.get(name, REPLICATED), shape)
                data = torch.zeros(local, dtype=getattr(torch, dtype), device=device)
                layer.register_parameter(part, torch.nn.Parameter(data, requires_grad=False))
            module.layers.append(layer)
        engine = TorchEngine(module, ParallelConfig(), None, plan)
        load = LoadConfig(verify_checksum=checked, device_copies=copies)
        managers.append(DynamicWeightManager(engine, load))
    return managers


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def _expected(manager, step: int, shapes) -> bool:
    """Whether every parameter of `manager` holds its slice of step `step`'s weights."""
    from fd_ray_sync.sharding import REPLICATED, take_shard

    plan = manager.engine.shard_plan()
    for name, param in manager.params.items():
        shape, dtype, _ = shapes[name]
        full = torch.empty(shape, dtype=getattr(torch, dtype), device=param.device)
        fill(full, name, step)
        if not torch.equal(_bits(param), _bits(take_shard(full, plan.get(name, REPLICATED)))):
            return False
    return True


def run(
    layers: int = 32,
    dim: int = 4096,
    rounds: int = 3,
    slot_mib: int = 256,
    device: str = "cuda:0",
    copies: str = "torch",
) -> dict:
    """Every method, checked and unchecked: a report (see the module docstring)."""
    import multiprocessing as mp

    from fd_ray_sync.feed import BucketFeed
    from fd_ray_sync.messages import TensorMeta
    from fd_ray_sync.sources.ipc import IpcRingSpec, IpcStorageSource, IpcStorageSpec

    if device != "cpu":
        torch.cuda.set_device(device)
    shapes = names_and_shapes(layers, dim)
    nbytes = sum(math.prod(s) * (2 if d == "bfloat16" else 4) for s, d, _ in shapes.values())
    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    # By module name, not `__main__`'s: the spawned child imports it from the package.
    from fd_ray_sync.gpucheck import fleet_path

    trainer = ctx.Process(
        target=fleet_path._trainer, args=(inbox, outbox, layers, dim, slot_mib << 20, device)
    )
    trainer.start()
    name = "cpu" if device == "cpu" else torch.cuda.get_device_name(device)
    report: dict = {"device": name, "bytes": nbytes, "copies": copies, "methods": {}}
    try:
        _, ring = outbox.get(timeout=TIMEOUT_S)
        report["floor_s"] = _floor(nbytes, device)
        LocalRingSource = _ring_source_class()
        announced = tuple(
            TensorMeta(
                name=n, shape=s, dtype=d, nbytes=math.prod(s) * (2 if d == "bfloat16" else 4)
            )
            for n, (s, d, _) in shapes.items()
        )
        step = 0
        for method in ("registered", "ring"):
            for checked in (False, True):
                managers = _ranks(layers, dim, checked, device, copies)
                pointers = [{n: p.data_ptr() for n, p in m.params.items()} for m in managers]
                times, identical = [], True
                for _ in range(rounds):
                    step += 1
                    version = f"v{step}"
                    inbox.put((method, step, checked))
                    outbox.get(timeout=TIMEOUT_S)  # the trainer's step is done: time from here
                    t0 = time.perf_counter()
                    inbox.put(("go",))
                    if method == "registered":
                        _, metas, segments = outbox.get(timeout=TIMEOUT_S)
                        spec = IpcStorageSpec(
                            version,
                            tensors=tuple(TensorMeta(**m) for m in metas),
                            segments=tuple(segments),
                        )
                        sources = [IpcStorageSource(spec, m.engine.shard_plan()) for m in managers]
                        _load_all(managers, sources, version, checked, device)
                    else:
                        feed = BucketFeed(TP, keep=False)
                        with ThreadPoolExecutor(8) as pool:
                            spec = IpcRingSpec(
                                version,
                                announced=announced,
                                feed=_LocalFeed(feed, pool),
                                uid="local",
                                keep=False,
                                slots=tuple(ring["ring"]),
                                slot_offsets=tuple(ring["offsets"]),
                            )
                            pump = threading.Thread(target=_pump, args=(feed, inbox, outbox))
                            pump.start()
                            sources = [
                                LocalRingSource(spec, _Ctx(m.engine.shard_plan(), r))
                                for r, m in enumerate(managers)
                            ]
                            _load_all(managers, sources, version, checked, device)
                            pump.join()
                    _sync(device)
                    times.append(time.perf_counter() - t0)
                    identical &= all(_expected(m, step, shapes) for m in managers)
                    inbox.put(("next",))
                kept = all(
                    {n: p.data_ptr() for n, p in m.params.items()} == ptrs
                    for m, ptrs in zip(managers, pointers)
                )
                best = min(times)
                key = method if checked else f"{method}_unchecked"
                report["methods"][key] = {
                    "seconds": best,
                    "gb_s": nbytes / best / 1e9,
                    "ratio_to_floor": report["floor_s"] / best,
                    "bit_identical": identical,
                    "pointers_kept": kept,
                    "rounds": times,
                }
                print(json.dumps({key: report["methods"][key]}), flush=True)
                del managers
    finally:
        inbox.put(("stop", 0, False))
        trainer.join(30)
        if trainer.is_alive():
            trainer.kill()
    return report


class _Ctx:
    """The RankContext fields a ring source reads."""

    def __init__(self, plan, rank):
        self.plan, self.rank = plan, rank


def _pump(feed, inbox, outbox) -> None:
    """Trainer messages of one ring update into the feed (and backpressure answers back)."""
    from fd_ray_sync.buckets import BucketMeta

    while True:
        msg = outbox.get(timeout=TIMEOUT_S)
        if msg[0] == "bucket":
            feed.add(BucketMeta(**msg[1]), msg[2])
        elif msg[0] == "wait":
            feed.wait_written(msg[1], TIMEOUT_S)
            inbox.put(("ok",))
        elif msg[0] == "end":
            feed.end(msg[1], None)
            return


def _load_all(managers, sources, version: str, checked: bool, device: str) -> None:
    """Both ranks load at once (threads), as two rank processes would: each on the device,
    with a stream of its own (a new thread starts on device 0 and the default stream)."""
    errors: queue.Queue = queue.Queue()

    def load(m, source):
        try:
            if device == "cpu":
                m.write_prepared(m.prepare_load(source, version, check_after_write=checked))
                return
            torch.cuda.set_device(device)
            with torch.cuda.stream(torch.cuda.Stream(device)):
                m.write_prepared(m.prepare_load(source, version, check_after_write=checked))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.put(e)

    threads = [threading.Thread(target=load, args=ms) for ms in zip(managers, sources)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not errors.empty():
        raise errors.get()


def _floor(nbytes: int, device: str) -> float:
    """Best of 5 (after one warm-up): one copy of `nbytes` on `device`."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(6):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=32, help="layers of 2 dim x dim bf16 matrices")
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--slot-mib", type=int, default=256, help="ring slot size")
    p.add_argument(
        "--copies",
        choices=("torch", "batched"),
        default="torch",
        help="the ranks' LoadConfig.device_copies: a torch copy per tensor, or one "
        "batched-copy kernel per chunk",
    )
    p.add_argument("--device", default="cuda:0", help="cuda:N, or cpu (shared memory)")
    p.add_argument("--out", help="write the report here as JSON")
    a = p.parse_args(argv)
    if a.device != "cpu" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (--device cpu runs the CPU twin)", file=sys.stderr)
        return 2
    report = run(a.layers, a.dim, a.rounds, a.slot_mib, a.device, a.copies)
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    ok = all(m["bit_identical"] and m["pointers_kept"] for m in report["methods"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
