"""The report: each method's row, the floor's rows, the verdict and the printed table."""

from __future__ import annotations

import statistics
import sys

from .plan import NAMES, RANK_EXTRA_TARGET_MIB, TARGETS, TP, GiB, max_or_none


def _row(times: list[float], nbytes: int) -> dict:
    best = min(times)
    return {
        "best_s": best,
        "median_s": statistics.median(times),
        "times_s": times,
        "bytes": nbytes,
        "gbps": nbytes / best / 1e9 if best > 0 else None,
    }


def summarize_method(method: str, out: dict, report: dict) -> dict:
    trainer, ranks = out["trainer"]["updates"], [out[n]["updates"] for n in NAMES[1:]]
    timed = [rec for rec in trainer if rec["phase"] == "timed"]
    received = TP * report["setup"]["rank_bytes"]  # every rank's slices: all of them move
    row = _row([rec["time_s"] for rec in timed], received)
    checked = [rec for recs in ranks for rec in recs if rec["phase"] != "refusal"]
    row["bit_identical"] = all(rec.get("ok") for rec in checked)
    row["mismatches"] = sorted({b for rec in checked for b in rec.get("bad", [])})[:5]
    row["checksums_ok"] = all(rec.get("checksum_ok") for rec in checked)
    row["trainer_extra_mib"] = max_or_none(rec["trainer_extra_mib"] for rec in timed)
    row["rank_extra_mib"] = [
        max_or_none(rec["extra_mib"] for rec in recs if rec["phase"] == "timed") for recs in ranks
    ]
    floor = report["methods"].get("floor", {})
    if method == "host":
        h2d = report["methods"].get("h2d_pinned", {})
        if h2d.get("gbps"):
            ref_s, row["ratio_to"] = (
                received / (h2d["gbps"] * 1e9),
                "pinned H2D of the same bytes",
            )
        elif floor.get("gbps"):
            ref_s, row["ratio_to"] = (
                received / (floor["gbps"] * 1e9),
                "floor copy of the same bytes (cpu)",
            )
        else:
            ref_s = None
    else:
        ref_s, row["ratio_to"] = floor.get("best_s"), "floor"
    row["ratio"] = ref_s / row["best_s"] if ref_s and row["best_s"] > 0 else None
    row["target"] = TARGETS.get(method)
    cpu = report["config"]["device"] == "cpu"  # CPU timings are only printed
    row["target_met"] = None if row["ratio"] is None or cpu else row["ratio"] >= row["target"]
    extra = [m for m in row["rank_extra_mib"] if m is not None]
    row["rank_memory_met"] = None if not extra else max(extra) < RANK_EXTRA_TARGET_MIB
    if method == "registered":
        refusal = [rec for recs in ranks for rec in recs if rec["phase"] == "refusal"]
        confirm = [rec for recs in ranks for rec in recs if rec["phase"] == "confirm"]
        report["refusal"] = {
            "seen": len(refusal) == TP and all(rec["refused"] for rec in refusal),
            "messages": [rec["refused"] for rec in refusal],
            "confirmed_after_reregister": len(confirm) == TP
            and all(rec.get("ok") for rec in confirm),
        }
    return row


COPIES = {
    "graph": "one CUDA graph of torch copies per bucket",
    "batched": "one CUDA graph of one batched-copy kernel per bucket",
    "eager": "each copy launched from Python (--copies eager)",
}


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _yes(v) -> str:
    return "-" if v is None else ("yes" if v else "NO")


def print_table(report: dict) -> None:
    na = "n/a" if report["config"]["device"] == "cpu" else "-"
    cols = ("method", "best s", "median s", "GB/s", "ratio", "target", "met", "bit-identical")
    cols += ("trainer+MiB", "rank0+MiB", "rank1+MiB")
    widths = (14, 9, 9, 8, 7, 7, 4, 13, 11, 10, 10)
    line = " ".join(f"{c:>{w}}" if k else f"{c:<{w}}" for k, (c, w) in enumerate(zip(cols, widths)))
    print("\n" + line + "\n" + "-" * len(line))
    for name, row in report["methods"].items():
        if "error" in row:
            print(f"{name:<14} FAILED: {row['error'][:200]}")
            continue
        ranks = row.get("rank_extra_mib") or [None, None]
        ratio = row.get("ratio")
        cells = (
            name,
            _fmt(row.get("best_s"), ".4f"),
            _fmt(row.get("median_s"), ".4f"),
            _fmt(row.get("gbps"), ".1f"),
            "-" if ratio is None else f"{ratio:.2f}x",
            _fmt(row.get("target"), ".2f"),
            _yes(row.get("target_met")),
            _yes(row.get("bit_identical")),
            _fmt(row.get("trainer_extra_mib"), ".1f", na),
            _fmt(ranks[0], ".1f", na),
            _fmt(ranks[1], ".1f", na),
        )
        print(
            " ".join(
                f"{c:>{w}}" if k else f"{c:<{w}}" for k, (c, w) in enumerate(zip(cells, widths))
            )
        )
    st = report.get("setup") or {}
    if st:
        opened = ", ".join(f"{r['opened_handles_s']:.3f}" for r in st.get("ranks", []))
        print(
            f"\nsetup: {st['tensors']} tensors, {st['model_bytes'] / GiB:.2f} GiB (hidden "
            f"{st['hidden']}); ring {st['ring']}; host ring {st['host_ring']}; ranks opened "
            f"every handle in {opened} s"
            + (
                f"; host bucket H2D {st['host_bucket_h2d_gbps']:.1f} GB/s"
                if "host_bucket_h2d_gbps" in st
                else ""
            )
        )
    cfg, env = report["config"], report["env"]
    if cfg["device"] == "cuda":
        print(
            f"copies: {COPIES.get(cfg.get('copies'), cfg.get('copies'))}; "
            f"MPS daemon: {'yes' if env.get('mps') else 'no'}; "
            f"device: {(env.get('device') or {}).get('name', '?')}"
        )
    ref = report.get("refusal")
    if ref:
        print(
            f"\nreallocation refusal seen: {_yes(ref['seen'])}; "
            f"update after re-registering verified: {_yes(ref['confirmed_after_reregister'])}"
        )
        for m in ref["messages"]:
            print(f"  {m}")
    print(
        "\ntargets: ring >= 0.45x floor, registered >= 0.8x floor, host >= 0.8x pinned H2D, "
        f"ranks' extra device memory < {RANK_EXTRA_TARGET_MIB:.0f} MiB"
    )
    for note in report["notes"]:
        print(f"note: {note}")
    sys.stdout.flush()


def record_floor(out: dict, report: dict) -> None:
    m = report["methods"]
    m["floor"] = {
        **_row(out["floor"]["times_s"], out["bytes"]),
        "bit_identical": out["floor"]["ok"],
        "trainer_extra_mib": out["floor"]["trainer_extra_mib"],
        "ratio": 1.0,
    }
    sliced = _row(out["floor_sliced"]["times_s"], out["bytes"])
    m["floor_sliced"] = {
        **sliced,
        "bit_identical": out["floor_sliced"]["ok"],
        "ratio_to": "floor",
        "ratio": m["floor"]["best_s"] / sliced["best_s"] if sliced["best_s"] else None,
    }
    if "h2d_pinned" in out:
        m["h2d_pinned"] = {
            **_row(out["h2d_pinned"]["times_s"], out["h2d_pinned"]["bytes"]),
            "bit_identical": out["h2d_pinned"]["ok"],
        }
        m["d2h_pinned"] = _row(out["d2h_pinned"]["times_s"], out["d2h_pinned"]["bytes"])
        report["env"]["device"] = out["device"]


def all_ok(report: dict, methods: list[str]) -> bool:
    rows = [report["methods"].get(m, {"error": "missing"}) for m in methods]
    if any("error" in r or not r.get("bit_identical") for r in rows):
        return False
    if "registered" in methods:
        ref = report.get("refusal") or {}
        return bool(ref.get("seen") and ref.get("confirmed_after_reregister"))
    return True
