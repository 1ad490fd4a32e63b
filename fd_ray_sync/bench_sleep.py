"""Sleep/wake cycles of a fleet, with each rank's memory after every step.

    python -m fd_ray_sync.bench_sleep --cycles 10 --d-model 1024 --layers 6 --tp 2

Launches a fleet of the reference LM (float32, sized by the flags: the defaults make about
290 MiB), loads seeded weights, then runs `cycles` times sleep(level) / wake_up() and reads
every rank's resident memory (RSS, and the private part of it: object-store pages a rank
maps count in RSS as shared) once asleep and once awake again, and the device allocator's
figures at the same two points where the ranks have a GPU. Level 1 must come back
bit-identical: the generation and every rank's fingerprint after the last cycle are checked
against the ones before the first. Prints one line per cycle and the whole run as JSON
(`--json` writes it to a file).
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import ray

from fd_ray_sync.config import FleetConfig, ParallelConfig
from fd_ray_sync.engine.reference import ReferenceEngine, iter_full_state_dict
from fd_ray_sync.engine.spec import ModelConfig, param_bytes
from fd_ray_sync.fleet import Fleet

MiB = 1 << 20
PROMPTS = ["The trainer ", "fleet"]


def _engine(model: ModelConfig, parallel: ParallelConfig, groups):
    return ReferenceEngine(model, parallel, groups)


def _memory(ranks: list) -> list[dict]:
    return ray.get([r.memory.remote() for r in ranks])


def run(model: ModelConfig, tp: int = 2, dp: int = 1, cycles: int = 10, level: int = 1) -> dict:
    """Launch, load, cycle, check; returns the measurements (bytes and seconds)."""
    config = FleetConfig(name="bench-sleep", tp=tp, dp=dp, enable_expert_parallel=False)
    fleet = Fleet.launch(config, engine_factory=functools.partial(_engine, model))
    try:
        fleet.update(dict(iter_full_state_dict(model, seed=1)), version=1)
        ranks = ray.get(fleet.coordinator.rank_handles.remote())
        texts = [r.text for r in fleet.generate(PROMPTS, 8)]
        fingerprints = [r["fingerprint"] for r in fleet.status()["ranks"]]
        start_rss = [m["rss"] for m in _memory(ranks)]
        rows = []
        for cycle in range(1, cycles + 1):
            t = time.perf_counter()
            fleet.sleep(level)
            sleep_s = time.perf_counter() - t
            asleep = _memory(ranks)
            device_asleep = ray.get([r.device_memory.remote() for r in ranks])  # empty on CPU
            t = time.perf_counter()
            fleet.wake_up()
            wake_s = time.perf_counter() - t
            if level == 2:  # nothing came back: the weights need an update
                fleet.update(dict(iter_full_state_dict(model, seed=1)), version=cycle + 1)
            awake = _memory(ranks)
            device = ray.get([r.device_memory.remote() for r in ranks])  # empty on CPU
            rows.append(
                {
                    "cycle": cycle,
                    "sleep_s": sleep_s,
                    "wake_s": wake_s,
                    "rss_asleep": [m["rss"] for m in asleep],
                    "rss_awake": [m["rss"] for m in awake],
                    "anon_asleep": [m["rss_anon"] for m in asleep],
                    "anon_awake": [m["rss_anon"] for m in awake],
                    "device_asleep": device_asleep,
                    "device_awake": device,
                }
            )
            print(_line(rows[-1]), flush=True)
        status = fleet.status()
        return {
            "model_bytes": param_bytes(model),
            "tp": tp,
            "dp": dp,
            "level": level,
            "rss_start": start_rss,
            "cycles": rows,
            "same_generation": [r.text for r in fleet.generate(PROMPTS, 8)] == texts,
            "same_fingerprints": level == 2
            or [r["fingerprint"] for r in status["ranks"]] == fingerprints,
        }
    finally:
        fleet.shutdown()


def _line(row: dict) -> str:
    mib = lambda values: " ".join(f"{v / MiB:7.1f}" for v in values)  # noqa: E731
    return (
        f"cycle {row['cycle']:2d}  sleep {row['sleep_s']:.3f}s  wake {row['wake_s']:.3f}s  "
        f"RSS MiB asleep [{mib(row['rss_asleep'])}]  awake [{mib(row['rss_awake'])}]  "
        f"of it private: [{mib(row['anon_asleep'])}]  [{mib(row['anon_awake'])}]"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m fd_ray_sync.bench_sleep", description=__doc__)
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--level", type=int, choices=(1, 2), default=1)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    model = ModelConfig(
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=8,
        d_ff=4 * args.d_model,
        max_seq_len=256,
    )
    print(f"model {param_bytes(model) / MiB:.0f} MiB, tp={args.tp} dp={args.dp}", flush=True)
    result = run(model, args.tp, args.dp, args.cycles, args.level)
    first, last = result["cycles"][0]["rss_awake"], result["cycles"][-1]["rss_awake"]
    growth = ", ".join(f"{(b - a) / MiB:+.1f}" for a, b in zip(first, last))
    print(f"RSS growth from cycle 1 to {args.cycles} (MiB per rank): {growth}")
    print(
        f"same generation: {result['same_generation']}, same fingerprints: "
        f"{result['same_fingerprints']}"
    )
    text = json.dumps(result, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return result


if __name__ == "__main__":
    main()
