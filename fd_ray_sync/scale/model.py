"""The cost model: one update's seconds from a setup (`PlanInputs`) and four `Constants`.

Every transport is the same pipeline, read off its `TransportModel` (no branching on names):

    trainer GPUs --stage--> trainer node --egress--> node 1 --> node 2 ... node N   (chain)
                                          \\-------> node 1, node 2 ... node N       (star)
    node --(NIC of each GPU, or the node's one link)--> GPU --(intra-node)--> GPU --write--> param

    T = fixed + stage + stream + fill + pieces + buckets + write
    stream  = max(egress / trainer-node bw, ingress / node bw + wait, intra / intra bw) / efficiency
    fill    = (hops - 1) * piece / (one NIC's bw * efficiency) + hops * delay
    pieces  = piece latency * (pieces per rail + hops - 1)
    buckets = bucket overhead * buckets;  fixed = per-update transaction cost
    stage   = the trainer's bytes per GPU / its copy bw;  write = a rank's share / its copy bw
    bw      = link_gbit / 8 * payload_share a NIC (payload_share: 1, or TCP's 1448/1514)

The object-store relay stores and forwards whole buckets (its fill's piece is a bucket), and
its backpressure lets c = buckets_in_flight - 1 of them travel the chain at once, plus
hops - 1 where the fleet widens its window along the chain (`relay_widened`, the default
since session 7): with k buckets and more hops than c, wait = (k - 1 - c) * (hops / c - 1)
* bucket / bw, which the widened window makes 0.

The network stages overlap each other (a pipeline); the copies and overheads are added on
top (conservative: our ranks do write while later buckets arrive). The four `Constants` enter
linearly (1/efficiency, piece latency, bucket overhead, fixed), so `fit` is a non-negative
least-squares solve on rows measured by `fd-ray-sync bench --nodes N --link-gbit B --json F`.
docs/scale.md derives the terms and names every assumption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

GB = 1e9
MiB = 1 << 20
RAY_CHUNK = 5 * MiB  # Ray's object_manager_default_chunk_size: the object store's "piece"
DTYPE_BYTES = MappingProxyType(
    {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
)
TERMS = ("fixed", "stage", "stream", "fill", "pieces", "buckets", "write")


class FrozenModel(BaseModel):
    """The package's pydantic models: frozen, unknown fields refused."""

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
    # A chain node hands a bucket on only once it holds all of it (ray.get, then ray.put of
    # its copy), and the trainer's backpressure (`buckets_in_flight`) bounds the buckets on
    # the chain.
    whole_buckets: bool


# name, what it does; then star, all_nics, lands_on_host, network, slices_on_wire, ray_objects,
# whole_buckets
TRANSPORTS = MappingProxyType({t.name: t for t in (
    TransportModel("naive_ray", "ray.put of the state dict; every rank node fetches it",
                   True, False, True, True, False, True, False),
    TransportModel("object_store", "buckets relayed node to node through Ray's object stores",
                   False, False, True, True, False, True, True),
    TransportModel("collective", "pieces forwarded along a chain of nodes, NCCL/gloo group",
                   False, True, False, True, True, False, False),
    TransportModel("ipc", "co-located: ranks copy from the trainer's memory on their node",
                   False, True, False, False, False, False, False),
)})  # fmt: skip


class PlanInputs(FrozenModel):
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
    payload_share: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Share of a link's rate left for payload once frame headers are paid. "
        "1: the link efficiency covers them too (the assumed constants); 1448/1514 for TCP "
        "over Ethernet at MTU 1500 (what the shaped bench's floor counts).",
    )
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
    buckets_in_flight: int = Field(
        2,
        ge=2,
        description="object_store relay: buckets put and not yet written by every rank, at "
        "most (FleetConfig.buckets_in_flight). Ranks report writes one bucket late, so "
        "buckets_in_flight - 1 travel the relay chain at once; a longer chain waits.",
    )
    relay_widened: bool = Field(
        True,
        description="object_store relay: the fleet adds hops - 1 to buckets_in_flight along "
        "a chain (what it does since session 7; runs measured before it had not).",
    )
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


class Constants(FrozenModel):
    """The fitted (or assumed) constants of one transport."""

    link_efficiency: float = Field(gt=0, le=1, description="Share of a link's rate reached.")
    piece_latency_s: float = Field(ge=0, description="Per piece per pipeline stage, seconds.")
    bucket_overhead_s: float = Field(ge=0, description="Per bucket (calls, metadata), seconds.")
    update_fixed_s: float = Field(ge=0, description="Per update (transaction phases), seconds.")
    source: str = Field("assumed (not yet fitted)", description="Where these numbers come from.")


# Not measured: what we assume for GPUs (NCCL over InfiniBand, Ray on GPU nodes), and what
# `plan` estimates with. Constants fitted to the shaped CPU runs describe the bench machine
# instead and are shown apart (docs/scale.md says why each value).
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


class Estimate(FrozenModel):
    """One update's predicted seconds, its terms, and the bytes behind them."""

    seconds: float
    floor_s: float = Field(description="Bytes that must move, at line rate, perfectly overlapped.")
    terms: dict[str, float]
    bottleneck: str
    bytes: dict[str, float]
    constants: Constants


@dataclass(frozen=True)
class Features:
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


def features(x: PlanInputs) -> Features:
    """The bytes and counts behind `x`'s estimate, before any constant is applied (what
    `estimate` prices and `fit` regresses on)."""
    t = TRANSPORTS[x.transport]
    m, n, g = x.model_bytes, x.nodes, x.gpus_per_node
    nic = x.link_gbit * GB / 8 * x.payload_share
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
    if t.ray_objects:
        piece, bucket = RAY_CHUNK, (m if t.star else x.bucket_bytes)
    else:
        piece, bucket = x.piece_bytes, x.bucket_bytes
    if not t.network or (x.colocated and n == 1):  # no network: a chain through the GPUs
        hops, rail_bw, chain, rails_used = 1, x.intra_gbyte * GB, intra, 1
    else:
        hops = 1 if t.star else (n - 1 if x.colocated else n)
        rail_bw, chain, rails_used = nic, ingress, rails
    fill_unit, wait = piece, 0.0
    if t.whole_buckets and t.network and chain > 0:
        # Store and forward: a node hands a bucket on once it holds all of it, so the pipeline
        # fills bucket by bucket. The trainer puts bucket j once every rank has reported j - w
        # written, and a rank reports that when it asks for j - w + 2 (just after fetching
        # j - w + 1): after the first w buckets, only c = w - 1 travel the chain at once. With
        # more hops than c, each c buckets take a trip down the chain (hops bucket-times)
        # instead of c bucket-times: (k - 1 - c) buckets wait (hops/c - 1) bucket-times each.
        fill_unit = min(bucket, chain / rails_used)
        c = x.buckets_in_flight - 1 + (hops - 1 if x.relay_widened else 0)
        k = chain / (rails_used * fill_unit)
        wait = max(0.0, k - 1 - c) * max(0.0, hops / c - 1) * fill_unit / rail_bw
    stages = {  # ties name the first: a node's ingress before the trainer's egress
        "node ingress": ingress / (nic * rails) + wait,
        "trainer egress": egress / (nic * rails),
        "intra-node fan-out": intra / (x.intra_gbyte * GB),
    }
    bottleneck = max(stages, key=stages.get)
    pieces = math.ceil(chain / (rails_used * piece))
    trainer_gpus = x.gpus if x.colocated else (x.trainer_gpus or x.trainer_nodes * g)
    stage_bw = x.h2d_gbyte if (t.lands_on_host or x.source == "host") else x.write_gbyte
    write_bw = x.h2d_gbyte if t.lands_on_host else x.write_gbyte
    return Features(
        stage=m / trainer_gpus / (stage_bw * GB),
        write=x.share_bytes / (write_bw * GB),
        delay=hops * x.delay_s,
        stream=stages[bottleneck],
        fill=max(0, hops - 1) * fill_unit / rail_bw,
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
    node_bw = x.link_gbit * GB / 8 * x.payload_share * x.nics_per_node
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
    f = features(x)
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


def validation_reasons(e: ValidationError) -> str:
    """A pydantic error as one line: each field and why it was refused."""
    return "; ".join(
        f"{'.'.join(map(str, er['loc'])) or 'inputs'}: {er['msg'].removeprefix('Value error, ')}"
        for er in e.errors()
    )
