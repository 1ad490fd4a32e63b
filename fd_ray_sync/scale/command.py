"""`fd-ray-sync plan`: its arguments, and the run that fits, estimates and reports."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path

from pydantic import ValidationError

from fd_ray_sync.errors import ConfigError
from fd_ray_sync.scale.measured import DEFAULT_MEASURED, find_measured, fit, load_measured
from fd_ray_sync.scale.model import (
    ASSUMED,
    DTYPE_BYTES,
    TRANSPORTS,
    Constants,
    MiB,
    PlanInputs,
    estimate,
    validation_reasons,
)
from fd_ray_sync.scale.report import (
    measured_table,
    print_estimate,
    print_fitted,
    published_table,
    variants_table,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", type=float, default=1e12, help="parameters (default 1e12)")
    p.add_argument("--dtype", choices=list(DTYPE_BYTES), default="fp8")
    p.add_argument("--gpus", type=int, default=256, help="inference GPUs to update")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ways on top of tp")
    p.add_argument("--link-gbit", type=float, default=400.0, help="Gbit/s of one NIC")
    p.add_argument(
        "--link-per",
        choices=["gpu", "node"],
        default="gpu",
        help="gpu: a NIC per GPU (a node sends and receives over all of them); node: one link",
    )
    p.add_argument("--intra-gbyte", type=float, default=400.0, help="GB/s into a GPU in a node")
    p.add_argument("--write-gbyte", type=float, default=1500.0, help="device-to-device GB/s")
    p.add_argument("--h2d-gbyte", type=float, default=54.0, help="pinned host-to-device GB/s")
    p.add_argument("--transport", choices=list(TRANSPORTS), default="collective")
    p.add_argument("--delivery", choices=["full", "slice"], default="full")
    p.add_argument("--bucket-mb", type=float, default=1024.0, help="MiB a bucket")
    p.add_argument(
        "--buckets-in-flight", type=int, default=2,
        help="object_store relay: FleetConfig.buckets_in_flight (the fleet adds the chain's "
        "hops - 1)",
    )  # fmt: skip
    p.add_argument("--piece-mb", type=float, default=16.0, help="MiB a piece (collective, ipc)")
    p.add_argument("--trainer-nodes", type=int, default=1, help="nodes the trainer sends from")
    p.add_argument("--trainer-gpus", type=int, default=None, help="trainer GPUs staging bytes")
    p.add_argument("--colocated", action="store_true", help="trainer shards on the rank nodes")
    p.add_argument("--source", choices=["device", "host"], default="device")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay a hop")
    p.add_argument("--fixed-s", type=float, default=None, help="override the per-update cost")
    p.add_argument(
        "--measured",
        nargs="*",
        default=None,
        help=f"bench --nodes JSON files or globs to fit and compare (default: {DEFAULT_MEASURED})",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--assumed", action="store_true",
        help="estimate with the assumed (GPU) constants: the default",
    )  # fmt: skip
    which.add_argument(
        "--fitted", action="store_true",
        help="estimate with the constants fitted to the measured runs instead (CPU gloo and "
        "Ray over shaped links on the bench machine, not NCCL on GPUs); the measured table "
        "always uses the fitted ones",
    )  # fmt: skip
    p.add_argument("--json", default=None, help="also write everything to this file")


def _inputs_from_args(args) -> PlanInputs:
    try:
        return PlanInputs(
            params=args.params, bytes_per_param=DTYPE_BYTES[args.dtype], gpus=args.gpus,
            gpus_per_node=args.gpus_per_node, tp=args.tp, ep=args.ep, link_gbit=args.link_gbit,
            nics_per_node=args.gpus_per_node if args.link_per == "gpu" else 1,
            intra_gbyte=args.intra_gbyte, write_gbyte=args.write_gbyte, h2d_gbyte=args.h2d_gbyte,
            transport=args.transport, delivery=args.delivery,
            bucket_bytes=int(args.bucket_mb * MiB), piece_bytes=int(args.piece_mb * MiB),
            buckets_in_flight=args.buckets_in_flight,
            trainer_nodes=args.trainer_nodes, trainer_gpus=args.trainer_gpus,
            colocated=args.colocated, source=args.source, delay_s=args.delay_ms / 1e3,
        )  # fmt: skip
    except ValidationError as e:
        raise ConfigError(validation_reasons(e)) from None


def run_from_args(args) -> int:
    x = _inputs_from_args(args)
    explicit = args.measured is not None
    files = find_measured(args.measured if explicit else [DEFAULT_MEASURED])
    runs, notes = [], []
    for f in files:
        got, said = load_measured(f)
        runs, notes = runs + got, notes + said
    fitted = fit(runs)
    # The fitted constants describe the bench machine (CPU processes, gloo and Ray over shaped
    # veth links), not NCCL on GPUs: the estimate keeps the assumed ones unless asked.
    constants = _override_fixed({**ASSUMED, **fitted}, args.fixed_s)
    chosen = constants if args.fitted else _override_fixed(ASSUMED, args.fixed_s)
    est = estimate(x, chosen[x.transport])
    print_estimate(x, est)
    table_of_variants = variants_table(x, chosen)
    table_of_published = published_table(chosen)
    print_fitted(fitted, args.fitted)
    held_out = {
        f: _override_fixed(fit([r for r in runs if r.file != f]), args.fixed_s)
        for f in {r.file for r in runs}
    }
    table_of_measured = measured_table(runs, constants, len(files), held_out)
    if not runs and not explicit:
        print(f"\nno measured runs ({DEFAULT_MEASURED} matched nothing): constants are assumed")
    for note in notes:
        print(f"  note: {note}")
    if args.json:
        doc = {
            "inputs": x.model_dump(),
            "estimate": est.model_dump(),
            "constants": {k: c.model_dump() for k, c in chosen.items()},
            "fitted": {k: c.model_dump() for k, c in fitted.items()},
            "variants": table_of_variants,
            "published": table_of_published,
            "measured": table_of_measured,
            "notes": notes,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 0


def _override_fixed(constants: Mapping[str, Constants], fixed_s: float | None) -> dict:
    if fixed_s is None:
        return dict(constants)
    if fixed_s < 0:
        raise ConfigError(f"--fixed-s {fixed_s:g}: a per-update cost cannot be negative")
    note = f"; update_fixed_s {fixed_s:g} s from --fixed-s"
    return {
        k: c.model_copy(update={"update_fixed_s": fixed_s, "source": c.source + note})
        for k, c in constants.items()
    }
