"""`fd-ray-sync bench`: weight transfer methods side by side on one synthetic model.

    python -m fd_ray_sync.bench --size-gb 1 --tp 2 --runs 3

Each method moves the same full weights (about 200 tensors) from this process (the trainer)
into `dp * tp` rank processes, each keeping only its TP slice. Per method: median seconds of
`runs` after two warm-ups, GB/s of the model, ratio to the floor (one copy into the object store
plus each rank's copy of its share, at the memcpy speed measured first), peak extra private
memory of the trainer and of each rank, and a check that every rank ended bit-identical to
its expected slice. The object store is drained between runs (Ray frees asynchronously and
a full store spills to disk).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import ray

from fd_ray_sync import ipc, shm
from fd_ray_sync.bench_baselines import run_baseline, run_rdt
from fd_ray_sync.bench_setup import (
    GB,
    WARMUP,
    OnRound,
    Setup,
    memcpy_gbps,
    no_round,
    wait_store_drained,
)
from fd_ray_sync.config import FleetConfig, LoadConfig
from fd_ray_sync.engine.synthetic import (
    SyntheticEngine,
)
from fd_ray_sync.memwatch import AnonPeak, Peak, memory_now
from fd_ray_sync.ray_stats import object_store_bytes_used

# --- methods ------------------------------------------------------------------------------


def _fleet(
    setup: Setup, name: str, checksums: bool, pipelined: bool = True, strategy="object_store"
):
    keep = setup.keep_committed
    from fd_ray_sync.fleet import Fleet

    config = FleetConfig(
        name=name,
        tp=setup.tp,
        dp=setup.dp,
        enable_expert_parallel=False,
        phase_timeout_s=600,
        load=LoadConfig(load_strategy=strategy, verify_checksum=checksums),
        fingerprint=checksums,
        keep_committed=keep,
        pipelined=pipelined,
    )
    factory = functools.partial(SyntheticEngine, setup.total_bytes)
    return Fleet.launch(config, engine_factory=factory)


def _rank_handles(fleet) -> list:
    return ray.get(fleet.coordinator.rank_handles.remote())


def run_fleet_method(setup: Setup, runs: int, how: str, on_round: OnRound = no_round) -> dict:
    """Ours: the object store (with or without checksums; pipelined, or gathered from an
    iterator), or per-rank snapshots."""
    gathered = how == "object_store_gathered"  # every bucket put first, then loaded
    checked = how in ("object_store", "ipc_ring", "ipc_registered", "collective")
    strategy = how.split("_")[0] if how.startswith(("ipc", "collective")) else "object_store"
    fleet = _fleet(setup, f"bench-{how}", checked, pipelined=not gathered, strategy=strategy)
    ranks = _rank_handles(fleet)
    folder = tempfile.mkdtemp(prefix="fdrs-bench-")
    times, extra = [], {}
    shared = registered = None
    if how.startswith("ipc_registered"):  # the trainer's weights live in shared memory
        shared = ipc.share(dict(setup.weights(0)))
        registered = fleet.register(shared)
    try:
        for run in range(runs + WARMUP):
            seed = version = run + 1
            if how == "snapshot":
                from fd_ray_sync.sources.snapshot import write_snapshot

                path = os.path.join(folder, f"v{version}")
                t = time.perf_counter()
                full = dict(setup.weights(seed))
                write_snapshot(
                    path, full, setup.plans.__getitem__, setup.tp, str(version), 256 << 20
                )
                extra["snapshot_write_s"] = time.perf_counter() - t
                del full
            # The trainer holds its model before the update starts, as a real one does.
            full = None if how == "snapshot" else dict(setup.weights(seed))
            if shared is not None:  # a training step, in place
                for n, a in full.items():
                    np.copyto(shared[n], a)
                full = registered
            kept = setup.model_bytes * 1.1 if setup.keep_committed else 0
            wait_store_drained(int(kept) + (64 << 20))
            ray.get([r.watch_memory.remote() for r in ranks])
            trainer = AnonPeak()
            store = Peak(object_store_bytes_used, 0.05)  # what the update adds to the store
            t = time.perf_counter()
            if how == "snapshot":
                fleet.update_from_snapshot(path, str(version))
            else:
                fleet.update(full, version=version, verify_fingerprints=False)
            dt = time.perf_counter() - t
            if how == "snapshot" and version > 1:  # only the committed version's files stay
                shutil.rmtree(os.path.join(folder, f"v{version - 1}"))
            del full
            trainer_extra = trainer.stop()
            extra["store_peak_extra_bytes"] = store.stop()
            rank_extra = ray.get([r.peak_extra_memory.remote() for r in ranks])
            if run >= WARMUP:
                times.append(dt)
            on_round(run + 1)
        if strategy == "object_store":  # what stays in the store: the rollback copy
            time.sleep(2.0)  # frees are asynchronous
            extra["rollback_copy_bytes"] = object_store_bytes_used()
        # Checked after the timed runs: every rank digests what it holds.
        got = {r["rank"]: r["fingerprint"] for r in ray.get([h.verify.remote() for h in ranks])}
        ok = got == setup.expected_fingerprints(runs + WARMUP)
    finally:
        fleet.shutdown()
        shutil.rmtree(folder, ignore_errors=True)
        if registered is not None:
            for name in {registered.segment_of(n) for n in shared}:
                shm.unlink(name)
    return {
        "times": times,
        "trainer_extra": trainer_extra,
        "rank_extra": rank_extra,
        "bit_identical": ok,
        **extra,
    }


METHODS = {
    "object_store": lambda s, n, r: run_fleet_method(s, n, "object_store", r),
    "object_store_unchecked": lambda s, n, r: run_fleet_method(s, n, "object_store_unchecked", r),
    "object_store_gathered": lambda s, n, r: run_fleet_method(s, n, "object_store_gathered", r),
    "snapshot": lambda s, n, r: run_fleet_method(s, n, "snapshot", r),
    "ipc_ring": lambda s, n, r: run_fleet_method(s, n, "ipc_ring", r),
    "ipc_registered": lambda s, n, r: run_fleet_method(s, n, "ipc_registered", r),
    "ipc_registered_unchecked": lambda s, n, r: run_fleet_method(
        s, n, "ipc_registered_unchecked", r
    ),
    "collective": lambda s, n, r: run_fleet_method(s, n, "collective", r),
    "naive_ray": lambda s, n, r: run_baseline(s, n, "naive_ray", r),
    "fastdeploy_pdparams": lambda s, n, r: run_baseline(s, n, "fastdeploy_pdparams", r),
    "rdt_gloo": run_rdt,
}


def run_bench(
    size_gb: float,
    tp: int,
    dp: int,
    runs: int,
    methods: list[str],
    keep_committed: bool = True,
    on_progress: Callable[[int, int, str], None] | None = None,
) -> dict:
    """Every method in turn; `on_progress(done, total, label)` hears of each round done."""
    report = on_progress or (lambda done, total, label: None)
    rounds = runs + WARMUP
    total = len(methods) * rounds
    setup = Setup(size_gb, tp, dp, keep_committed)
    gbps = memcpy_gbps()
    floor = setup.floor_s(gbps)
    out = {
        "model_bytes": setup.model_bytes,
        "tensors": len(setup.shapes),
        "tp": tp,
        "dp": dp,
        "runs": runs,
        "memcpy_gbps": gbps,
        "floor_s": floor,
        "trainer_rss_before": memory_now()["rss_anon"],
        "methods": {},
    }
    for i, name in enumerate(methods):
        on_round = functools.partial(_report_round, report, name, i * rounds, total, rounds)
        on_round(0)
        try:
            result = METHODS[name](setup, runs, on_round)
        except Exception as e:  # noqa: BLE001 - one method's failure is a result, not the end
            result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
        if "times" in result:
            median = statistics.median(result["times"])
            result.update(
                seconds=median,
                gbps=setup.model_bytes / median / GB,
                ratio_to_floor=median / floor,
                bytes_leaving_trainer_node=0,  # one node: every transfer stays local
            )
        out["methods"][name] = result
        print(_row(name, result), flush=True)
        report((i + 1) * rounds, total, f"{name} done")
    naive = out["methods"].get("naive_ray", {}).get("seconds")
    for ours in (
        "object_store",
        "object_store_unchecked",
        "object_store_gathered",
        "ipc_ring",
        "ipc_registered",
        "ipc_registered_unchecked",
    ):
        seconds = out["methods"].get(ours, {}).get("seconds")
        if naive and seconds:
            out[f"{ours}_speedup_vs_naive"] = naive / seconds
    return out


def _report_round(
    report: Callable[[int, int, str], None],
    name: str,
    first: int,
    total: int,
    rounds: int,
    done: int,
) -> None:
    label = f"round {done + 1}/{rounds}" if done < rounds else "checking the ranks"
    report(first + done, total, f"{name}: {label}")


def _row(name: str, r: dict) -> str:
    if "error" in r:
        return f"{name:24s} {r['error']}"
    ranks = " ".join(f"{b / 2**20:.0f}" for b in r["rank_extra"])
    return (
        f"{name:24s} {r['seconds']:7.3f}s {r['gbps']:6.2f} GB/s  x{r['ratio_to_floor']:5.2f} floor"
        f"  trainer +{r['trainer_extra'] / 2**20:5.0f} MiB  ranks +[{ranks}] MiB"
        f"  bit-identical {r['bit_identical']}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fd-ray-sync bench", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size-gb", type=float, default=1.0, help="model size in GiB")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--runs", type=int, default=3, help="timed runs after two warm-ups")
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated (default: all of the mode's; with --link-gbit: collective, "
        "object_store_relay, naive_ray)",
    )
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument(
        "--nodes",
        default=None,
        help="comma-separated rank node counts (e.g. 2,4): run the multi-node bench on a "
        "local ray.cluster_utils cluster per count instead (see fd_ray_sync.bench_nodes)",
    )
    p.add_argument(
        "--bucket-mb", type=int, default=256, help="multi-node bench: bucket size in MiB"
    )
    p.add_argument(
        "--link-gbit",
        type=float,
        default=None,
        help="with --nodes N: a shaped network instead (every node in its own network "
        "namespace behind a link of this many Gbit/s; root only; see fd_ray_sync.bench_net)",
    )
    p.add_argument(
        "--delay-ms", type=float, default=0.0, help="shaped network: one-way delay (netem)"
    )
    p.add_argument(
        "--replicas-per-node",
        type=int,
        default=1,
        help="shaped network: replicas on each rank node (2 or more: the rebuilt replica "
        "has a peer on its own node)",
    )
    p.add_argument(
        "--no-rollback-copy",
        action="store_true",
        help="ours: do not keep the committed version in the object store",
    )


def run_from_args(args, on_progress: Callable[[int, int, str], None] | None = None) -> int:
    """The bench as the command line asks; `on_progress` hears of the one-node bench's rounds."""
    if args.nodes and args.link_gbit:
        from fd_ray_sync import bench_net

        methods = args.methods.split(",") if args.methods else list(bench_net.METHODS)
        result = {}
        for nodes in (int(n) for n in args.nodes.split(",") if n):
            r = bench_net.run_shaped(
                args.size_gb,
                args.tp,
                nodes,
                args.link_gbit,
                args.runs,
                args.bucket_mb,
                methods,
                args.delay_ms,
                args.replicas_per_node,
            )
            result = {**r, "nodes": {**result.get("nodes", {}), **r["nodes"]}}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        return 0
    if args.nodes:
        from fd_ray_sync.bench_nodes import run_nodes

        counts = [int(n) for n in args.nodes.split(",") if n]
        result = run_nodes(args.size_gb, args.tp, counts, args.runs, args.bucket_mb)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        return 0
    methods = [m for m in (args.methods or ",".join(METHODS)).split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}; known: {', '.join(METHODS)}")
    if not ray.is_initialized():
        ray.init(namespace="fd_ray_sync", log_to_driver=False, num_cpus=2 * args.tp * args.dp)
    setup = Setup(args.size_gb, args.tp, args.dp)
    print(
        f"model {setup.model_bytes / 2**30:.2f} GiB in {len(setup.shapes)} tensors, "
        f"dp={args.dp} x tp={args.tp}, {args.runs} runs after {WARMUP} warm-ups"
    )
    result = run_bench(
        args.size_gb, args.tp, args.dp, args.runs, methods, not args.no_rollback_copy, on_progress
    )
    for name, r in result["methods"].items():
        if "rollback_copy_bytes" in r:
            print(
                f"{name}: rollback copy kept in the object store: "
                f"{r['rollback_copy_bytes'] / 2**30:.2f} GiB; the update's peak on top of "
                f"it: {r['store_peak_extra_bytes'] / 2**30:.2f} GiB"
            )
    ratios = "".join(
        f"; {k.removesuffix('_speedup_vs_naive')} vs naive_ray x{v:.2f}"
        for k, v in result.items()
        if k.endswith("_speedup_vs_naive")
    )
    print(f"memcpy {result['memcpy_gbps']:.1f} GB/s; floor {result['floor_s']:.3f}s{ratios}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
