"""The parent: arguments, one command at a time to a fresh tree after any failure, the report."""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import shutil
import sys
import time
import traceback

import torch
import torch.multiprocessing as tmp

from . import __doc__ as PACKAGE_DOC
from .plan import (
    CPU_METHODS,
    CUDA_METHODS,
    NAMES,
    TP,
    GiB,
    MiB,
    align,
    hidden_size,
    model_specs,
    plan_buckets,
)
from .proc import Ctl
from .report import all_ok, print_table, record_floor, summarize_method
from .tree import StepFailed, Tree


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpucheck", description=PACKAGE_DOC.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument(
        "--gib", type=float, default=None, help="model size (default 16 on cuda, 0.05 on cpu)"
    )
    p.add_argument("--updates", type=int, default=5, help="timed updates per method")
    p.add_argument(
        "--bucket-mib",
        type=float,
        default=None,
        help="ring and host bucket size (default 512 on cuda, 2 on cpu)",
    )
    p.add_argument("--ring-buckets", type=int, default=3, help="device buckets in the ring (>= 2)")
    p.add_argument(
        "--host-buckets", type=int, default=3, help="pinned host buckets in the ring (>= 2)"
    )
    p.add_argument(
        "--methods", default=None, help="comma-separated subset of: " + ",".join(CUDA_METHODS)
    )
    p.add_argument(
        "--timeout-s", type=float, default=480.0, help="global limit; children are killed after it"
    )
    p.add_argument(
        "--step-timeout-s", type=float, default=180.0, help="limit of setup and of each method"
    )
    p.add_argument(
        "--copies",
        choices=("graph", "batched", "eager"),
        default=None,
        help="how a bucket's copies are launched on cuda: one CUDA graph of one batched-copy "
        "kernel (default where cuda.bindings imports; the kernel is compiled with NVRTC), one "
        "CUDA graph of torch copies, or each copy from Python",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--inject-fault",
        action="append",
        default=[],
        metavar="WHO:METHOD:KIND",
        help="tests only: make trainer|rank0|rank1 raise|exit|hang in a method's 2nd update",
    )
    p.add_argument(
        "--out", default=None, help="JSON report (default $OUT/gpucheck.json, else ./gpucheck.json)"
    )
    a = p.parse_args(argv)
    cuda = a.device == "cuda"
    a.gib = a.gib if a.gib is not None else (16.0 if cuda else 0.05)
    a.bucket_mib = a.bucket_mib if a.bucket_mib is not None else (512.0 if cuda else 2.0)
    a.copies_note = None
    if not cuda:
        a.copies = "eager"
    elif a.copies is None:
        a.copies = "batched"
        try:
            from cuda.bindings import driver, nvrtc  # noqa: F401
        except ImportError as e:
            a.copies = "graph"
            a.copies_note = f"--copies graph: the batched kernel needs cuda.bindings ({e})"
    known = CUDA_METHODS if cuda else CPU_METHODS
    a.methods = [m.strip() for m in a.methods.split(",")] if a.methods else list(known)
    unknown = [m for m in a.methods if m not in known]
    if unknown:
        p.error(f"unknown method(s) {unknown} for --device {a.device}; known: {', '.join(known)}")
    a.methods = ["floor"] + [m for m in a.methods if m != "floor"]  # every ratio needs it, first
    if not (2 <= a.ring_buckets <= Ctl.MAX_SLOTS and 2 <= a.host_buckets <= Ctl.MAX_SLOTS):
        p.error(f"--ring-buckets and --host-buckets must be between 2 and {Ctl.MAX_SLOTS}")
    if a.updates < 1 or a.gib <= 0 or a.bucket_mib <= 0:
        p.error("--updates, --gib and --bucket-mib must be positive")
    a.faults = {}
    for f in a.inject_fault:
        who, method, kind = (f.split(":") + ["", "", ""])[:3]
        if who not in NAMES or method not in known or kind not in ("raise", "exit", "hang"):
            p.error(f"--inject-fault {f!r}: want WHO:METHOD:KIND, e.g. rank1:ring:exit")
        a.faults[f"{who}:{method}"] = kind
    if a.out is None:
        a.out = os.path.join(os.environ.get("OUT") or ".", "gpucheck.json")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    deadline = t_start + args.timeout_s
    faulthandler.dump_traceback_later(args.timeout_s + 90, exit=True)  # the parent's own backstop
    os.environ.setdefault("PYTHONUNBUFFERED", "1")

    def log(msg, *a):
        text = msg % a if a else msg
        print(f"[{time.monotonic() - t_start:8.2f}s  parent] {text}\n", end="", flush=True)

    if args.device == "cuda" and not torch.cuda.is_available():
        log(
            "--device cuda but torch.cuda.is_available() is False (torch %s); use --device cpu",
            torch.__version__,
        )
        return 2
    specs = model_specs(args.gib)
    cfg = {
        "device": args.device,
        "gib": args.gib,
        "updates": args.updates,
        "bucket_mib": args.bucket_mib,
        "ring_buckets": args.ring_buckets,
        "host_buckets": args.host_buckets,
        "timeout_s": args.timeout_s,
        "seed": args.seed,
        "copies": args.copies,
        "faults": args.faults,
        "t_start": t_start,
    }
    try:  # the plan is checked here, before any process starts
        plan_buckets([s.nbytes for s in specs], align(int(args.bucket_mib * MiB)))
    except ValueError as e:
        log("%s", e)
        return 2
    report: dict = {
        "config": {
            **cfg,
            "methods": args.methods,
            "tp": TP,
            "tensors": len(specs),
            "hidden": hidden_size(args.gib),
        },
        "env": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
            "dev_shm_free_mib": _shm_free_mib(),
            "cpus": os.cpu_count(),
            "mps": _mps_running(),
        },
        "setup": {},
        "methods": {},
        "notes": [
            "rank and trainer +MiB: torch.cuda.max_memory_allocated() over the transfer minus what "
            "the process held before (peaks reset after setup); memory opened through CUDA IPC is "
            "not counted by the opener's allocator",
            "bytes: what all ranks receive in an update (every rank's slices); ratio: floor "
            "seconds / method seconds (host: pinned H2D seconds for those bytes, which all cross "
            "host to device / method seconds), best of the timed updates",
        ],
        "errors": {},
    }
    if args.copies_note:
        report["notes"].append(args.copies_note)
    if args.device == "cpu":
        report["notes"].append(
            "cpu run: shared memory instead of CUDA IPC; timings are only printed, "
            "the targets are for the GPU"
        )
    log(
        "model: %d tensors, %.3f GiB, hidden %d; methods %s; %s",
        len(specs),
        sum(s.nbytes for s in specs) / GiB,
        hidden_size(args.gib),
        ",".join(args.methods),
        report["env"],
    )
    ctx = tmp.get_context("spawn")
    remaining = list(args.methods)
    tree: Tree | None = None
    starts, timed_out = 0, False

    def step_deadline() -> float:
        return min(deadline, time.monotonic() + args.step_timeout_s)

    try:
        while remaining:
            if time.monotonic() > deadline:
                timed_out = True
                break
            if tree is None:
                if starts >= 3:
                    break
                starts += 1
                log("starting trainer and ranks (spawn), try %d", starts)
                tree = Tree(cfg, ctx, log)
                step = "floor" if remaining[0] == "floor" else "setup"
                try:
                    if step == "floor":
                        remaining.pop(0)
                        out = tree.command("floor", ("trainer",), step_deadline())["trainer"]
                        _guarded(log, report, "floor", record_floor, out, report)
                    step = "setup"
                    setup = tree.command("setup", NAMES, step_deadline())
                    report["setup"] = {**setup["trainer"], "ranks": [setup[n] for n in NAMES[1:]]}
                except StepFailed as e:
                    log("%s", e)
                    report["errors"][f"{step} (try {starts})"] = e.errors
                    if step == "floor":
                        report["methods"]["floor"] = {"error": e.summary()}
                    tree.kill()
                    tree = None
                    timed_out = e.timed_out and time.monotonic() > deadline
                    continue
            method = remaining.pop(0)
            log("method %s", method)
            try:
                out = tree.command(method, NAMES, step_deadline())
                row = _guarded(log, report, method, summarize_method, method, out, report)
                if row is not None:
                    report["methods"][method] = row
                    log("%s: %s", method, {k: v for k, v in row.items() if k != "times_s"})
            except StepFailed as e:
                log("%s", e)
                report["methods"][method] = {"error": e.summary()}
                report["errors"][method] = e.errors
                tree.kill()
                tree = None
                timed_out = e.timed_out and time.monotonic() > deadline
    finally:
        if tree is not None:
            tree.close()
        for m in remaining:
            why = (
                "global timeout"
                if timed_out or time.monotonic() > deadline
                else "the trainer and ranks could not be set up"
            )
            report["methods"][m] = {"error": f"not run: {why}"}
        print_table(report)
        ok = all_ok(report, args.methods)
        report["complete"] = ok
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2, default=str)
            log("wrote %s", args.out)
        except OSError as e:
            log("could not write %s: %s", args.out, e)
    faulthandler.cancel_dump_traceback_later()
    if timed_out:
        return 3
    return 0 if ok else 1


def _guarded(log, report: dict, name: str, fn, *args):
    """A bug in summing up one method's results is that method's error, not the run's end."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001
        tb = traceback.format_exc()
        log("summing up %s failed:\n%s", name, tb)
        report["methods"][name] = {"error": "summary failed: " + tb.strip().splitlines()[-1]}
        report["errors"][f"{name} summary"] = tb
        return None


def _mps_running() -> bool:
    """Whether an NVIDIA MPS daemon runs (CUDA processes then share the GPU's context, so the
    trainer's and the ranks' kernels run side by side instead of taking turns). Its control
    pipe outlives ``quit``, so the process table is asked, not the pipe."""
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return False
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().startswith("nvidia-cuda-mps"):
                    return True
        except OSError:
            continue
    return False


def _shm_free_mib() -> float | None:
    try:
        return shutil.disk_usage("/dev/shm").free / MiB
    except OSError:
        return None
