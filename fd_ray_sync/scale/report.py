"""What `fd-ray-sync plan` prints: the estimate term by term, the same setup moved the other
ways, the published figures next to ours, and each measured run next to its prediction. Each
table is printed and returned as rows for `--json`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

from fd_ray_sync.scale.measured import MeasuredRun
from fd_ray_sync.scale.model import (
    DTYPE_BYTES,
    GB,
    TERMS,
    TRANSPORTS,
    Constants,
    Estimate,
    MiB,
    PlanInputs,
    estimate,
)
from fd_ray_sync.scale.published import PUBLISHED

TERM_ABOUT = MappingProxyType(
    {
        "fixed": "per update: transaction phases (prepare, pause, verify, commit)",
        "stage": "trainer copies its bytes into send buffers",
        "stream": "the pipeline's slowest network/fan-out stage (relay: with its window waits)",
        "fill": "pipeline fill: (hops - 1) pieces (relay: buckets), plus per-hop delay",
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
        (
            "object_store relay, window not widened",
            _with(x, transport="object_store", delivery="full", relay_widened=False),
        ),
        ("naive_ray", _with(x, transport="naive_ray", delivery="full")),
    ]


def variants_table(x: PlanInputs, constants: Mapping[str, Constants]) -> list[dict]:
    out = []
    print("\nsame setup, other ways (s):")
    for label, v in variants(x):
        e = estimate(v, constants[v.transport])
        out.append({"variant": label, "inputs": v.model_dump(), **e.model_dump()})
        print(f"  {label:38s} {e.seconds:8.2f}  (floor {e.floor_s:.2f}; {e.bottleneck})")
    return out


def published_table(constants: Mapping[str, Constants]) -> list[dict]:
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


def constants_text(c: Constants) -> str:
    return (
        f"constants, {c.source}: link efficiency {c.link_efficiency:.3g}, piece latency "
        f"{c.piece_latency_s * 1e6:.3g} us, bucket overhead {c.bucket_overhead_s * 1e3:.3g} ms, "
        f"update fixed {c.update_fixed_s:.3g} s"
    )


def print_fitted(fitted: Mapping[str, Constants], used: bool) -> None:
    """The fitted constants, labelled as what they are: the bench machine's, not a GPU's."""
    if not fitted:
        return
    print(
        "\nfitted constants: CPU processes on the bench machine, gloo and Ray over tbf-shaped "
        "veth links, efficiency against the TCP payload rate; they describe that machine, not "
        "NCCL on InfiniBand"
        + ("" if used else " (the estimate above uses the assumed ones; --fitted to use these)")
    )
    for transport, c in fitted.items():
        print(f"  {transport:12s} {constants_text(c)}")


def measured_table(
    runs: Sequence[MeasuredRun],
    constants: Mapping[str, Constants],
    files: int,
    held_out: Mapping[str, Mapping[str, Constants]],
) -> list[dict]:
    """Each measured run next to its prediction, the ratio, the ratio to a prediction from
    constants fitted without its file (`held_out`, by file; "-" where the other files have
    no run of its transport), and the bytes the trainer's node sent."""
    if not runs:
        return []
    out = []
    print(f"\nmeasured vs. predicted ({len(runs)} run(s) from {files} file(s)):")
    print(
        f"  {'file':34s} {'nodes':>5s} {'method':20s} {'link':>6s} {'floor':>7s} "
        f"{'measured':>9s} {'predicted':>9s} {'ratio':>6s} {'held-out':>8s}  "
        "trainer sent x model (predicted)"
    )
    for r in runs:
        e = estimate(r.inputs, constants[r.inputs.transport])
        other = held_out.get(r.file, {}).get(r.inputs.transport)
        held = None if other is None else estimate(r.inputs, other)
        held_text = "-" if held is None else f"{r.seconds / held.seconds:.2f}"
        sent, model = r.trainer_sent_bytes, e.bytes["model"]
        egress = e.bytes["egress_per_trainer_node"] / model
        sent_text = "" if sent is None else f"{sent / model:.2f} ({egress:.2f})"
        if not r.fittable():
            sent_text += " re-sent: not fitted"
        out.append(
            {
                **r.model_dump(),
                "predicted": e.model_dump(),
                "held_out_predicted": None if held is None else held.model_dump(),
                "fitted": r.fittable(),
            }
        )
        print(
            f"  {Path(r.file).name:34s} {r.nodes:5d} {r.method:20s} {r.inputs.link_gbit:5g}G "
            f"{e.floor_s:6.3f}s {r.seconds:8.3f}s {e.seconds:8.3f}s {r.seconds / e.seconds:6.2f} "
            f"{held_text:>8s}  {sent_text}"
        )
    return out


def print_estimate(x: PlanInputs, e: Estimate) -> None:
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
        f"{x.bucket_bytes / MiB:g} MiB, piece {x.piece_bytes / MiB:g} MiB"
        + (f" ({x.buckets_in_flight} buckets in flight)" if t.whole_buckets else "")
        + f"; trainer {trainer}, weights on {x.source}"
    )
    print(f"  {constants_text(c)}")
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
