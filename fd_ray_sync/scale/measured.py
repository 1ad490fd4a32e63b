"""Measured runs: loading `fd-ray-sync bench --nodes N --link-gbit B --json F` files, and
fitting the model's four constants to them (non-negative least squares)."""

from __future__ import annotations

import glob
import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np
from pydantic import ValidationError

from fd_ray_sync.bench_net import PAYLOAD
from fd_ray_sync.errors import ConfigError
from fd_ray_sync.scale.model import (
    ASSUMED,
    Constants,
    FrozenModel,
    MiB,
    PlanInputs,
    features,
    floor_s,
    validation_reasons,
)

DEFAULT_MEASURED = "docs/bench-net*.json"  # what `plan` loads without --measured

# Method names `fd-ray-sync bench --nodes` writes, and the transport modelling each.
METHOD_TRANSPORTS = MappingProxyType(
    {
        "collective": "collective",
        "object_store_relay": "object_store",
        "naive_ray": "naive_ray",
        "ipc": "ipc",
    }
)
# Assumed when a file has no `memcpy_gbps`: the bench machine's host copies, GB/s
# (docs/benchmarks.md measured 9.5-14.5 GB/s on it).
HOST_COPY_GBYTE = 10.0
CONSTANT_NAMES = ("link_efficiency", "piece_latency_s", "bucket_overhead_s", "update_fixed_s")
# When runs cannot tell all four apart, fit the first ones here and hold the rest as assumed.
_FIT_ORDER = (0, 3, 1, 2)
# A run whose trainer node sent more than this times the bytes the model has its transport
# send is left out of the fit: the model prices the bytes a transport is built to move, not
# re-sent ones (Ray's object manager re-sending chunks over a congested link).
EXCESS_SENT = 1.25


class MeasuredRun(FrozenModel):
    """One method's median seconds at one node count, from a shaped-network bench file."""

    file: str
    nodes: int
    method: str
    seconds: float
    inputs: PlanInputs
    floor_s: float | None = None
    trainer_sent_bytes: float | None = None

    def sent_x_modelled(self) -> float | None:
        """The bytes the trainer's node sent over those the model has it send (None when
        the file did not count them)."""
        modelled = features(self.inputs).bytes["egress_per_trainer_node"]
        if self.trainer_sent_bytes is None or not modelled:
            return None
        return self.trainer_sent_bytes / modelled

    def fittable(self) -> bool:
        """False when the trainer's node sent over EXCESS_SENT times the modelled bytes."""
        return (self.sent_x_modelled() or 0.0) <= EXCESS_SENT


def load_measured(path: str | Path) -> tuple[list[MeasuredRun], list[str]]:
    """The runs in one `fd-ray-sync bench --nodes N --link-gbit B --json F` file, and notes on
    what it lacked and was assumed or skipped. A missing required field raises ConfigError
    naming the file and the field.

    The bench's layout: the trainer on its own node, one replica of `tp` CPU ranks on each rank
    node, every node's link shaped to `link_gbit` (one link a node), tensors in host memory.
    Its links are tbf-shaped at `link_gbit` including Ethernet/IP/TCP headers, and its
    `floor_s` counts only payload (PAYLOAD = 1448/1514 of the rate): the runs are read with
    that payload share, so the model's floor is the file's and a fitted efficiency is the
    share of the payload rate reached (the bench's 1/x_floor, for the stream).
    """
    path = str(path)
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e}") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not JSON: {e}") from e

    def need(obj, key: str, where: str, kind=None):
        if not isinstance(obj, dict) or key not in obj:
            raise ConfigError(
                f"{path}: {where} lacks field {key!r} (expected the layout "
                "`fd-ray-sync bench --nodes N --link-gbit B --json F` writes)"
            )
        if kind is None:
            return obj[key]
        try:
            return kind(obj[key])
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: {where}: {key}={obj[key]!r} is not a number") from None

    notes = []
    if doc.get("replicas_per_node", 1) != 1:
        notes.append(f"{path}: {doc['replicas_per_node']} replicas a node: not the layout "
                     "the model reads; skipped")  # fmt: skip
        return [], notes
    link, tp = need(doc, "link_gbit", "the file", float), need(doc, "tp", "the file", int)
    bucket_mb = need(doc, "bucket_mb", "the file", float)
    piece_mb = doc.get("piece_mb")
    if piece_mb is None:
        piece_mb = bucket_mb
        notes.append(f"{path}: no 'piece_mb': pieces taken as whole buckets")
    copy = doc.get("memcpy_gbps")
    if copy is None:
        copy = HOST_COPY_GBYTE
        notes.append(f"{path}: no 'memcpy_gbps': host copies assumed {copy:g} GB/s")
    # One replica of tp CPU ranks a node, one link a node, the trainer alone on its node.
    setup = dict(
        bytes_per_param=1, gpus_per_node=tp, tp=tp, link_gbit=link, nics_per_node=1,
        payload_share=PAYLOAD, intra_gbyte=copy, write_gbyte=copy, h2d_gbyte=copy,
        bucket_bytes=int(bucket_mb * MiB),
        piece_bytes=int(piece_mb * MiB), trainer_gpus=1, source="host",
        delay_s=need(doc, "delay_ms", "the file", float) / 1e3 if "delay_ms" in doc else 0.0,
        relay_widened=bool(doc.get("relay_widened", False)),  # files before it say nothing
    )  # fmt: skip
    runs = []
    for count, entry in need(doc, "nodes", "the file").items():
        where = f"nodes[{count!r}]"
        n = need({"count": count}, "count", where, int)
        model = need(entry, "model_bytes", where, float)
        for method, result in need(entry, "methods", where).items():
            seconds = need(result, "seconds", f"{where}.methods[{method!r}]", float)
            if method not in METHOD_TRANSPORTS:
                notes.append(f"{path}: {where}: no model for method {method!r}; skipped")
                continue
            if result.get("bit_identical") is False:
                notes.append(f"{path}: {where}: {method} was not bit-identical; skipped")
                continue
            try:
                inputs = PlanInputs(
                    **setup, params=model, gpus=n * tp, transport=METHOD_TRANSPORTS[method]
                )
            except ValidationError as e:
                raise ConfigError(f"{path}: {where}: {method}: {validation_reasons(e)}") from None
            sent = (result.get("sent_by_node_bytes") or {}).get("trainer")
            floor = entry.get("floor_s")
            if floor is not None and abs(floor_s(inputs) / floor - 1) > 0.01:
                notes.append(
                    f"{path}: {where}: {method}: the file's floor {floor:.3f}s is not the "
                    f"model's {floor_s(inputs):.3f}s (different link or payload accounting?)"
                )
            runs.append(
                MeasuredRun(
                    file=path, nodes=n, method=method, seconds=seconds, inputs=inputs,
                    floor_s=floor, trainer_sent_bytes=sent,
                )
            )  # fmt: skip
    return runs, notes


def find_measured(patterns: Iterable[str]) -> list[str]:
    """Files matching each glob pattern (a plain path that does not exist is kept, so that
    loading it says so)."""
    found = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern))
        found.extend(matches or ([] if glob.has_magic(pattern) else [pattern]))
    return found


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Non-negative least squares for a handful of columns: the best of the unconstrained
    solutions on each subset of columns whose coefficients are all non-negative."""
    best, best_res = np.zeros(a.shape[1]), float(np.linalg.norm(b))
    for k in range(1, a.shape[1] + 1):
        for cols in itertools.combinations(range(a.shape[1]), k):
            sol = np.linalg.lstsq(a[:, cols], b, rcond=None)[0]
            if (sol < 0).any():
                continue
            res = float(np.linalg.norm(a[:, cols] @ sol - b))
            if res < best_res - 1e-12 * max(1.0, best_res):
                best, best_res = np.zeros(a.shape[1]), res
                best[list(cols)] = sol
    return best


def _identifiable(a: np.ndarray) -> list[int]:
    """Columns the rows can tell apart, in _FIT_ORDER (at most one per row)."""
    scaled = a / np.maximum(np.abs(a).max(axis=0), 1e-300)
    chosen: list[int] = []
    for j in _FIT_ORDER:
        cand = chosen + [j]
        if len(cand) <= a.shape[0] and np.linalg.matrix_rank(scaled[:, cand]) == len(cand):
            chosen = cand
    return chosen


def fit(
    runs: Sequence[MeasuredRun], base: Mapping[str, Constants] = ASSUMED
) -> dict[str, Constants]:
    """Constants per transport fitted to `runs` by non-negative least squares.

    Efficiency is kept <= 1 (fitted as 1/efficiency = 1 + d, d >= 0). Constants the runs
    cannot determine (e.g. bucket overhead when every run has the same bucket count, which
    makes it indistinguishable from the fixed cost) are held at `base` and named in `source`.
    Runs that are not `fittable` (bytes re-sent beyond the model's) are left out, and named.
    """
    out = {}
    by_transport: dict[str, list[MeasuredRun]] = {}
    left_out: dict[str, list[str]] = {}
    for run in runs:
        if not run.fittable():
            left_out.setdefault(run.inputs.transport, []).append(
                f"{Path(run.file).name} ({run.nodes} nodes, trainer sent "
                f"{run.sent_x_modelled():.2f}x the modelled bytes)"
            )
            continue
        by_transport.setdefault(run.inputs.transport, []).append(run)
    for transport, rows in by_transport.items():
        feats = [features(r.inputs) for r in rows]
        a = np.array([f.row() for f in feats])
        y = np.array([r.seconds - f.known() for r, f in zip(rows, feats)])
        b = base[transport]
        theta = np.array(
            [1 / b.link_efficiency, b.piece_latency_s, b.bucket_overhead_s, b.update_fixed_s]
        )
        cols = _identifiable(a)
        theta[cols] = [1.0 if j == 0 else 0.0 for j in cols]  # 1/efficiency = 1 + d, d >= 0
        held = [j for j in range(4) if j not in cols]
        target = y - a[:, held] @ theta[held] - (a[:, 0] if 0 in cols else 0)
        theta[cols] += _nnls(a[:, cols], target)
        files = sorted({r.file for r in rows})
        held_names = ", ".join(CONSTANT_NAMES[j] for j in held) or "none"
        out[transport] = Constants(
            link_efficiency=1 / theta[0],
            piece_latency_s=theta[1],
            bucket_overhead_s=theta[2],
            update_fixed_s=theta[3],
            source=f"fitted to {len(rows)} run(s) in {', '.join(files)}; "
            f"held at assumed: {held_names}"
            + "".join(f"; left out: {r}" for r in left_out.get(transport, [])),
        )
    return out
