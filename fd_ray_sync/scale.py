"""`fd-ray-sync plan`: one update's time at scale, on paper, from a small explicit cost model.

Every transport is the same pipeline, read off its `TransportModel` (no branching on names):

    trainer GPUs --stage--> trainer node --egress--> node 1 --> node 2 ... node N   (chain)
                                          \\-------> node 1, node 2 ... node N       (star)
    node --(NIC of each GPU, or the node's one link)--> GPU --(intra-node)--> GPU --write--> param

    T = fixed + stage + stream + fill + pieces + buckets + write
    stream  = max(egress / trainer-node bw, ingress / node bw, intra / intra bw) / efficiency
    fill    = (hops - 1) * piece / (one NIC's bw * efficiency) + hops * delay
    pieces  = piece latency * (pieces per rail + hops - 1)
    buckets = bucket overhead * buckets;  fixed = per-update transaction cost
    stage   = the trainer's bytes per GPU / its copy bw;  write = a rank's share / its copy bw

The network stages overlap each other (a pipeline); the copies and overheads are added on
top (conservative: our ranks do write while later buckets arrive). The four `Constants` enter
linearly (1/efficiency, piece latency, bucket overhead, fixed), so `fit` is a non-negative
least-squares solve on rows measured by `fd-ray-sync bench --nodes N --link-gbit B --json F`.
docs/scale.md derives the terms and names every assumption.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fd_ray_sync.errors import ConfigError

GB = 1e9
MiB = 1 << 20
RAY_CHUNK = 5 * MiB  # Ray's object_manager_default_chunk_size: the object store's "piece"
DTYPE_BYTES = MappingProxyType(
    {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
)
TERMS = ("fixed", "stage", "stream", "fill", "pieces", "buckets", "write")
DEFAULT_MEASURED = "docs/bench-net*.json"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class TransportModel:
    """How one transport moves bytes, in the terms the model needs."""

    name: str
    about: str
    star: bool  # every rank node fetches from the trainer nodes (else a chain by node)
    all_nics: bool  # stripes over every NIC of a node (NCCL rails); else one link per node
    lands_on_host: bool  # bytes land in host memory; the rank's write is a host-to-device copy
    network: bool  # False: co-located, ranks copy from the trainer's memory on their node
    slices_on_wire: bool  # can send each GPU only its slice (delivery "slice"), else whole
    ray_objects: bool  # pieces are Ray's 5 MiB chunks; star: the model is one object


# name, what it does; then star, all_nics, lands_on_host, network, slices_on_wire, ray_objects
TRANSPORTS = MappingProxyType({t.name: t for t in (
    TransportModel("naive_ray", "ray.put of the state dict; every rank node fetches it",
                   True, False, True, True, False, True),
    TransportModel("object_store", "buckets relayed node to node through Ray's object stores",
                   False, False, True, True, False, True),
    TransportModel("collective", "pieces forwarded along a chain of nodes, NCCL/gloo group",
                   False, True, False, True, True, False),
    TransportModel("ipc", "co-located: ranks copy from the trainer's memory on their node",
                   False, True, False, False, False, False),
)})  # fmt: skip


class PlanInputs(_Frozen):
    """One update's setup: model, fleet, links, transport."""

    params: float = Field(gt=0, description="Parameters in the model.")
    bytes_per_param: float = Field(gt=0, description="1 for FP8, 2 for BF16 (DTYPE_BYTES).")
    gpus: int = Field(ge=1, description="Inference GPUs (ranks) to update.")
    gpus_per_node: int = Field(8, ge=1, description="Inference GPUs per node.")
    tp: int = Field(1, ge=1, description="Tensor-parallel size.")
    ep: int = Field(
        1,
        ge=1,
        description="Expert-parallel ways on top of tp; a replica spans "
        "tp*ep GPUs, each holding 1/(tp*ep) of the model.",
    )
    link_gbit: float = Field(gt=0, description="Inter-node bandwidth of one NIC, Gbit/s.")
    nics_per_node: int = Field(8, ge=1, description="NICs per node (8: one per GPU).")
    intra_gbyte: float = Field(gt=0, description="GB/s one GPU receives over intra-node links.")
    write_gbyte: float = Field(1500.0, gt=0, description="Device-to-device copy GB/s.")
    h2d_gbyte: float = Field(54.0, gt=0, description="Pinned host<->device copy GB/s.")
    transport: str = Field("collective", description="A name in TRANSPORTS.")
    delivery: Literal["full", "slice"] = Field(
        "full",
        description="collective only. full: every GPU receives every byte and keeps its "
        "slice; slice: each GPU receives only its slice, over its own NIC where it has one.",
    )
    bucket_bytes: int = Field(1 << 30, ge=1, description="Bytes per bucket.")
    piece_bytes: int = Field(16 * MiB, ge=1, description="Bytes per piece of a bucket.")
    trainer_nodes: int = Field(
        1, ge=1, description="Nodes the trainer sends from, each its 1/trainer_nodes of the model."
    )
    trainer_gpus: int | None = Field(
        None,
        ge=1,
        description="Trainer GPUs staging the bytes (default: trainer_nodes * gpus_per_node; "
        "colocated: every GPU).",
    )
    colocated: bool = Field(
        False,
        description="The trainer's shards already sit on the rank "
        "nodes, 1/N each (checkpoint-engine's layout).",
    )
    source: Literal["device", "host"] = Field(
        "device", description="Where the trainer's weights are: GPU memory or host memory."
    )
    delay_s: float = Field(0.0, ge=0, description="One-way delay added per hop, seconds.")

    @model_validator(mode="after")
    def _check(self) -> PlanInputs:
        if self.transport not in TRANSPORTS:
            raise ValueError(f"unknown transport {self.transport!r}; known: {list(TRANSPORTS)}")
        if self.gpus % (self.tp * self.ep):
            raise ValueError(f"gpus={self.gpus} is not a multiple of tp*ep={self.tp * self.ep}")
        if self.delivery == "slice" and not TRANSPORTS[self.transport].slices_on_wire:
            raise ValueError(
                f"delivery 'slice' is a collective's choice, not {self.transport}'s: Ray's "
                "transports move whole buckets, ipc ranks copy only their slice anyway"
            )
        if self.colocated and self.trainer_nodes != 1:
            raise ValueError(
                "colocated: the trainer sends from every rank node; leave trainer_nodes at 1"
            )
        return self

    @property
    def model_bytes(self) -> float:
        return self.params * self.bytes_per_param

    @property
    def nodes(self) -> int:
        return math.ceil(self.gpus / self.gpus_per_node)

    @property
    def share_bytes(self) -> float:
        """A rank's slice (replicated norms and the like taken as negligible)."""
        return self.model_bytes / (self.tp * self.ep)


class Constants(_Frozen):
    """The fitted (or assumed) constants of one transport."""

    link_efficiency: float = Field(gt=0, le=1, description="Share of a link's rate reached.")
    piece_latency_s: float = Field(ge=0, description="Per piece per pipeline stage, seconds.")
    bucket_overhead_s: float = Field(ge=0, description="Per bucket (calls, metadata), seconds.")
    update_fixed_s: float = Field(ge=0, description="Per update (transaction phases), seconds.")
    source: str = Field("assumed (not yet fitted)", description="Where these numbers come from.")


# Not measured: assumptions until shaped-network runs are fitted (docs/scale.md says why each).
ASSUMED = MappingProxyType({
    "collective": Constants(link_efficiency=0.85, piece_latency_s=50e-6,
                            bucket_overhead_s=1e-3, update_fixed_s=0.3),
    "ipc": Constants(link_efficiency=0.85, piece_latency_s=50e-6,
                     bucket_overhead_s=1e-3, update_fixed_s=0.3),
    "object_store": Constants(link_efficiency=0.7, piece_latency_s=100e-6,
                              bucket_overhead_s=5e-3, update_fixed_s=0.3),
    "naive_ray": Constants(link_efficiency=0.7, piece_latency_s=100e-6,
                           bucket_overhead_s=5e-3, update_fixed_s=0.05),
})  # fmt: skip


class Estimate(_Frozen):
    """One update's predicted seconds, its terms, and the bytes behind them."""

    seconds: float
    floor_s: float = Field(description="Bytes that must move, at line rate, perfectly overlapped.")
    terms: dict[str, float]
    bottleneck: str
    bytes: dict[str, float]
    constants: Constants


@dataclass(frozen=True)
class _Features:
    """The estimate as `known + (1/eff) * x_link + latency * x_pieces + ...`, term by term."""

    stage: float
    write: float
    delay: float
    stream: float  # seconds at line rate (efficiency 1)
    fill: float  # seconds at line rate, without the delay
    pieces: int
    buckets: int
    bottleneck: str
    bytes: dict

    def row(self) -> list[float]:
        """The fit's columns: 1/efficiency, piece latency, bucket overhead, fixed."""
        return [self.stream + self.fill, float(self.pieces), float(self.buckets), 1.0]

    def known(self) -> float:
        return self.stage + self.write + self.delay


def _features(x: PlanInputs) -> _Features:
    t = TRANSPORTS[x.transport]
    m, n, g = x.model_bytes, x.nodes, x.gpus_per_node
    nic = x.link_gbit * GB / 8
    rails = x.nics_per_node if t.all_nics else 1
    local = 1 / n if x.colocated else 0.0  # share of the model already on each node
    # Distinct bytes a node's GPUs hold: the model, or (slices, a replica over several nodes)
    # the node's part of it.
    held = m * min(1.0, g / (x.tp * x.ep)) if x.delivery == "slice" else m
    if t.network:
        ingress = held * (1 - local)
        senders = n if x.colocated else x.trainer_nodes
        fetchers = n if t.star else 1
        egress = 0.0 if x.colocated and n == 1 else m / senders * fetchers
    else:
        ingress = egress = 0.0
    # A GPU takes every byte (delivery full) or only its slice; without a network (ipc) a rank
    # copies only its slice out of the trainer's memory.
    need = x.share_bytes if x.delivery == "slice" or not t.network else m
    if t.lands_on_host:
        intra = 0.0  # ranks read the node's object store: their write is the copy
    elif t.network:
        own_nic = ingress / g if rails == g else 0.0
        intra = max(0.0, need - own_nic - m * local / g)
    else:
        intra = need
    stages = {  # ties name the first: a node's ingress before the trainer's egress
        "node ingress": ingress / (nic * rails),
        "trainer egress": egress / (nic * rails),
        "intra-node fan-out": intra / (x.intra_gbyte * GB),
    }
    bottleneck = max(stages, key=stages.get)
    if t.ray_objects:
        piece, bucket = RAY_CHUNK, (m if t.star else x.bucket_bytes)
    else:
        piece, bucket = x.piece_bytes, x.bucket_bytes
    if not t.network or (x.colocated and n == 1):  # no network: a chain through the GPUs
        hops, rail_bw, chain, rails_used = 1, x.intra_gbyte * GB, intra, 1
    else:
        hops = 1 if t.star else (n - 1 if x.colocated else n)
        rail_bw, chain, rails_used = nic, ingress, rails
    pieces = math.ceil(chain / (rails_used * piece))
    trainer_gpus = x.gpus if x.colocated else (x.trainer_gpus or x.trainer_nodes * g)
    stage_bw = x.h2d_gbyte if (t.lands_on_host or x.source == "host") else x.write_gbyte
    write_bw = x.h2d_gbyte if t.lands_on_host else x.write_gbyte
    return _Features(
        stage=m / trainer_gpus / (stage_bw * GB),
        write=x.share_bytes / (write_bw * GB),
        delay=hops * x.delay_s,
        stream=stages[bottleneck],
        fill=max(0, hops - 1) * piece / rail_bw,
        pieces=pieces + max(0, hops - 1) if pieces else 0,
        buckets=math.ceil(m / bucket),
        bottleneck=bottleneck,
        bytes={
            "model": m,
            "egress_per_trainer_node": egress,
            "ingress_per_node": ingress,
            "intra_per_gpu": intra,
            "write_per_gpu": x.share_bytes,
        },
    )


def floor_s(x: PlanInputs) -> float:
    """The least any transport could take: bytes that must move, at line rate, overlapped.

    A GPU writes at least its slice; a node receives at least the distinct bytes its GPUs hold
    (less its local shard), over all its NICs; the trainer nodes send the model once.
    """
    m, n, g = x.model_bytes, x.nodes, x.gpus_per_node
    node_bw = x.link_gbit * GB / 8 * x.nics_per_node
    parts = [x.share_bytes / (max(x.write_gbyte, x.h2d_gbyte) * GB)]
    if TRANSPORTS[x.transport].network:
        local = 1 / n if x.colocated else 0.0
        parts.append(m * min(1.0, g / (x.tp * x.ep)) * (1 - local) / node_bw)
        if not x.colocated:
            parts.append(m / x.trainer_nodes / node_bw)
    else:
        parts.append(x.share_bytes / (x.intra_gbyte * GB))
    return max(parts)


def estimate(x: PlanInputs, constants: Constants | None = None) -> Estimate:
    """One update's seconds for `x`, with `constants` (default: ASSUMED for its transport)."""
    c = constants or ASSUMED[x.transport]
    f = _features(x)
    terms = {
        "fixed": c.update_fixed_s,
        "stage": f.stage,
        "stream": f.stream / c.link_efficiency,
        "fill": f.fill / c.link_efficiency + f.delay,
        "pieces": c.piece_latency_s * f.pieces,
        "buckets": c.bucket_overhead_s * f.buckets,
        "write": f.write,
    }
    return Estimate(
        seconds=sum(terms.values()),
        floor_s=floor_s(x),
        terms=terms,
        bottleneck=f.bottleneck,
        bytes=f.bytes,
        constants=c,
    )


# --- measured runs and the fit ------------------------------------------------------------

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


class MeasuredRun(_Frozen):
    """One method's median seconds at one node count, from a shaped-network bench file."""

    file: str
    nodes: int
    method: str
    seconds: float
    inputs: PlanInputs
    floor_s: float | None = None
    trainer_sent_bytes: float | None = None


def load_measured(path: str | Path) -> tuple[list[MeasuredRun], list[str]]:
    """The runs in one `fd-ray-sync bench --nodes N --link-gbit B --json F` file, and notes on
    what it lacked and was assumed or skipped. A missing required field raises ConfigError
    naming the file and the field.

    The bench's layout: the trainer on its own node, one replica of `tp` CPU ranks on each rank
    node, every node's link shaped to `link_gbit` (one link a node), tensors in host memory.
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
        intra_gbyte=copy, write_gbyte=copy, h2d_gbyte=copy, bucket_bytes=int(bucket_mb * MiB),
        piece_bytes=int(piece_mb * MiB), trainer_gpus=1, source="host",
        delay_s=need(doc, "delay_ms", "the file", float) / 1e3 if "delay_ms" in doc else 0.0,
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
                raise ConfigError(f"{path}: {where}: {method}: {_reasons(e)}") from None
            sent = (result.get("sent_by_node_bytes") or {}).get("trainer")
            runs.append(
                MeasuredRun(
                    file=path, nodes=n, method=method, seconds=seconds, inputs=inputs,
                    floor_s=entry.get("floor_s"), trainer_sent_bytes=sent,
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


def _reasons(e: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(map(str, er['loc'])) or 'inputs'}: {er['msg'].removeprefix('Value error, ')}"
        for er in e.errors()
    )


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
    """
    out = {}
    by_transport: dict[str, list[MeasuredRun]] = {}
    for run in runs:
        by_transport.setdefault(run.inputs.transport, []).append(run)
    for transport, rows in by_transport.items():
        feats = [_features(r.inputs) for r in rows]
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
            f"held at assumed: {held_names}",
        )
    return out


# --- published figures, modelled with the same equations and constants ---------------------


class Published(_Frozen):
    """A published update time and its setup, as our model reads it."""

    name: str
    seconds: float
    source: str
    inputs: PlanInputs
    assumed: str = Field(description="What the publication does not say and we assumed.")


GiB = 1 << 30
PUBLISHED = (
    Published(
        name="checkpoint-engine: Qwen3-235B-A22B BF16 -> 8xH800 TP8", seconds=6.22,
        source="github.com/MoonshotAI/checkpoint-engine README, Benchmark, Update (Broadcast)",
        inputs=PlanInputs(params=235e9, bytes_per_param=2, gpus=8, tp=8, link_gbit=400,
                          intra_gbyte=200, bucket_bytes=int(2.67 * GiB), colocated=True,
                          source="host"),
        assumed="H800 NVLink 400 GB/s both ways -> 200 GB/s into a GPU; weights in host memory "
        "of the same node, sharded over its 8 GPUs (their layout); bucket 2.67 GiB (theirs)",
    ),
    Published(
        name="checkpoint-engine: Kimi-K2 1T FP8 -> 256xH20 TP16", seconds=16.04,
        source="github.com/MoonshotAI/checkpoint-engine README, Benchmark, Update (Broadcast)",
        inputs=PlanInputs(params=1e12, bytes_per_param=1, gpus=256, tp=16, link_gbit=400,
                          intra_gbyte=450, bucket_bytes=8 * GiB, colocated=True, source="host"),
        assumed="network not published: 8 x 400 Gbit/s NICs a node; H20 NVLink 900 GB/s both "
        "ways -> 450 GB/s into a GPU; 1e12 params x 1 B; bucket 8 GiB (theirs)",
    ),
    Published(
        name="verl: Qwen3-30B-A3B BF16 -> 30 rollouts, 4x8 H100", seconds=7.0,
        source="github.com/volcengine/verl verl/checkpoint_engine/README.md, Benchmark "
        "(~7 s, 8.25 GB/s)",
        inputs=PlanInputs(params=30.5e9, bytes_per_param=2, gpus=30, tp=1, link_gbit=400,
                          intra_gbyte=450, trainer_gpus=2),
        assumed="ConnectX-7 400 Gbit/s, one a GPU; H100 NVLink 450 GB/s into a GPU; the 2 FSDP "
        "trainer GPUs on a node of their own; our 1 GiB buckets",
    ),
)  # fmt: skip


# --- the command ----------------------------------------------------------------------------

TERM_ABOUT = MappingProxyType(
    {
        "fixed": "per update: transaction phases (prepare, pause, verify, commit)",
        "stage": "trainer copies its bytes into send buffers",
        "stream": "the pipeline's slowest network/fan-out stage",
        "fill": "pipeline fill: (hops - 1) pieces, plus per-hop delay",
        "pieces": "piece latency x (pieces + hops - 1)",
        "buckets": "bucket overhead x buckets",
        "write": "each rank's copy into its parameters",
    }
)


def _with(x: PlanInputs, **changes) -> PlanInputs:
    return PlanInputs(**{**x.model_dump(), **changes})


def variants(x: PlanInputs) -> list[tuple[str, PlanInputs]]:
    """The same setup, moved the other ways the product can (or could) move it."""
    return [
        ("collective, full model to every GPU", _with(x, transport="collective", delivery="full")),
        ("collective, each GPU only its slice", _with(x, transport="collective", delivery="slice")),
        (
            "collective, full, one NIC a node",
            _with(x, transport="collective", delivery="full", nics_per_node=1),
        ),
        ("object_store relay", _with(x, transport="object_store", delivery="full")),
        ("naive_ray", _with(x, transport="naive_ray", delivery="full")),
    ]


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
    p.add_argument(
        "--assumed", action="store_true",
        help="estimate with the assumed constants even where measured runs were fitted (the "
        "measured table still uses the fitted ones)",
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
            trainer_nodes=args.trainer_nodes, trainer_gpus=args.trainer_gpus,
            colocated=args.colocated, source=args.source, delay_s=args.delay_ms / 1e3,
        )  # fmt: skip
    except ValidationError as e:
        raise ConfigError(_reasons(e)) from None


def run_from_args(args) -> int:
    x = _inputs_from_args(args)
    explicit = args.measured is not None
    files = find_measured(args.measured if explicit else [DEFAULT_MEASURED])
    runs, notes = [], []
    for f in files:
        got, said = load_measured(f)
        runs, notes = runs + got, notes + said
    fitted = fit(runs)
    constants = _override_fixed({**ASSUMED, **fitted}, args.fixed_s)
    chosen = _override_fixed(ASSUMED, args.fixed_s) if args.assumed else constants
    est = estimate(x, chosen[x.transport])
    _print_estimate(x, est)
    table_of_variants = _variants_table(x, chosen)
    table_of_published = _published_table(chosen)
    table_of_measured = _measured_table(runs, constants, len(files))
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


def _variants_table(x: PlanInputs, constants: Mapping[str, Constants]) -> list[dict]:
    out = []
    print("\nsame setup, other ways (s):")
    for label, v in variants(x):
        e = estimate(v, constants[v.transport])
        out.append({"variant": label, "inputs": v.model_dump(), **e.model_dump()})
        print(f"  {label:38s} {e.seconds:8.2f}  (floor {e.floor_s:.2f}; {e.bottleneck})")
    return out


def _published_table(constants: Mapping[str, Constants]) -> list[dict]:
    out = []
    print("\npublished vs. ours (same equations and constants; our transport on their setup):")
    print(f"  {'figure':58s} {'published':>9s} {'ours':>7s} {'pub/ours':>8s}  our bottleneck")
    for i, p in enumerate(PUBLISHED):
        e = estimate(p.inputs, constants[p.inputs.transport])
        out.append({**p.model_dump(), "predicted": e.model_dump(), "ratio": p.seconds / e.seconds})
        print(
            f"  [{i + 1}] {p.name:54s} {p.seconds:8.2f}s {e.seconds:6.2f}s "
            f"{p.seconds / e.seconds:8.2f}  {e.bottleneck}"
        )
    for i, p in enumerate(PUBLISHED):
        print(f"  [{i + 1}] assumed: {p.assumed}")
    return out


def _measured_table(runs: Sequence[MeasuredRun], constants, files: int) -> list[dict]:
    """Each measured run next to its prediction (and the bytes the trainer's node sent)."""
    if not runs:
        return []
    out = []
    print(f"\nmeasured vs. predicted ({len(runs)} run(s) from {files} file(s)):")
    print(
        f"  {'file':34s} {'nodes':>5s} {'method':20s} {'link':>6s} {'measured':>9s} "
        f"{'predicted':>9s} {'ratio':>6s}  trainer sent x model (predicted)"
    )
    for r in runs:
        e = estimate(r.inputs, constants[r.inputs.transport])
        sent, model = r.trainer_sent_bytes, e.bytes["model"]
        egress = e.bytes["egress_per_trainer_node"] / model
        sent_text = "" if sent is None else f"{sent / model:.2f} ({egress:.2f})"
        out.append({**r.model_dump(), "predicted": e.model_dump()})
        print(
            f"  {Path(r.file).name:34s} {r.nodes:5d} {r.method:20s} {r.inputs.link_gbit:5g}G "
            f"{r.seconds:8.3f}s {e.seconds:8.3f}s {r.seconds / e.seconds:6.2f}  {sent_text}"
        )
    return out


def _print_estimate(x: PlanInputs, e: Estimate) -> None:
    t, c = TRANSPORTS[x.transport], e.constants
    dtype = next((k for k, v in DTYPE_BYTES.items() if v == x.bytes_per_param), "?")
    node_bw = x.link_gbit / 8 * x.nics_per_node
    print(
        f"plan: {x.params:.3g} params x {x.bytes_per_param:g} B ({dtype}) = "
        f"{x.model_bytes / GB:.1f} GB; {x.gpus} GPUs = {x.nodes} node(s) x {x.gpus_per_node}, "
        f"tp {x.tp} x ep {x.ep} ({x.gpus // (x.tp * x.ep)} replicas, "
        f"{x.share_bytes / GB:.1f} GB a GPU)"
    )
    print(
        f"  links: {x.link_gbit:g} Gbit/s x {x.nics_per_node} NIC(s) a node ({node_bw:g} GB/s), "
        f"intra-node {x.intra_gbyte:g} GB/s into a GPU, D2D {x.write_gbyte:g} GB/s, "
        f"H2D {x.h2d_gbyte:g} GB/s, delay {x.delay_s * 1e3:g} ms a hop"
    )
    gpus = x.trainer_gpus or x.trainer_nodes * x.gpus_per_node
    trainer = f"{x.trainer_nodes} node(s), {gpus} GPU(s)"
    if x.colocated:
        trainer = "colocated (shards on every rank node)"
    print(
        f"  transport {x.transport} ({t.about}), delivery {x.delivery}, bucket "
        f"{x.bucket_bytes / MiB:g} MiB, piece {x.piece_bytes / MiB:g} MiB; trainer {trainer}, "
        f"weights on {x.source}"
    )
    print(
        f"  constants, {c.source}: link efficiency {c.link_efficiency:.3g}, piece latency "
        f"{c.piece_latency_s * 1e6:.3g} us, bucket overhead {c.bucket_overhead_s * 1e3:.3g} ms, "
        f"update fixed {c.update_fixed_s:.3g} s"
    )
    print(
        f"\nestimate {e.seconds:.2f} s (bandwidth floor {e.floor_s:.2f} s; bottleneck: "
        f"{e.bottleneck})"
    )
    for name in TERMS:
        print(f"  {name:8s} {e.terms[name]:8.3f} s  {TERM_ABOUT[name]}")
    b = e.bytes
    print(
        f"  bytes: {b['egress_per_trainer_node'] / GB:.1f} GB out of each trainer node, "
        f"{b['ingress_per_node'] / GB:.1f} GB into each node, {b['intra_per_gpu'] / GB:.1f} GB "
        f"into each GPU over intra-node links, {b['write_per_gpu'] / GB:.1f} GB written a GPU"
    )
