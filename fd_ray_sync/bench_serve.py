"""`python -m fd_ray_sync.bench_serve`: requests per second as replicas grow, and while
updates stream in (all-replica transactions side by side with rolling updates).

Clients are asyncio tasks of this process, each sending one request at a time through
`Fleet.generate` (the router: straight to a replica's front), all the same prompt (an
engine call decodes a prompt repeated in its batch once, so a batch costs about one
prompt's arithmetic, as a batched forward pass on a GPU would). Per fleet size dp (tp=1):
requests per second and the median latency over `--seconds`. Then, at the largest dp, a
trainer thread pushes updates back to back for `--seconds` while the clients run, once per
update mode: requests answered during the updates, per second, and the longest time no
request was answered (how long serving stopped).

Two engines, chosen with `--engine`:
- reference: the reference LM on CPU. On a machine with fewer cores than replicas the
  replicas compete for the cores, so this measures the machine as much as the fleet.
- paced (default): the same model and weights, and each engine call also waits
  `--step-ms` per generated token with the CPU free, as a GPU decoding a batch does (one
  wait per call, whatever the batch). It measures the serving path (router, fronts,
  batching, gates), not a model's arithmetic, and says so in its output.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import threading
import time

from fd_ray_sync.comm import CommGroups
from fd_ray_sync.config import FleetConfig, ParallelConfig

PROMPT = "The trainer "


def paced_engine(model: str, step_s: float, parallel: ParallelConfig, groups: CommGroups):
    """The reference engine, with a device-like wait of `step_s` per token of each call."""
    from fd_ray_sync.engine.reference import ReferenceEngine
    from fd_ray_sync.engine.spec import preset

    class PacedEngine(ReferenceEngine):
        def generate(self, prompts, max_new_tokens):
            texts = super().generate(prompts, max_new_tokens)
            time.sleep(step_s * max_new_tokens)
            return texts

    return PacedEngine(preset(model), parallel, groups)


def _launch(name: str, dp: int, args, **extra):
    from fd_ray_sync.fleet import Fleet, reference_engine

    if args.engine == "paced":
        factory = functools.partial(paced_engine, "tiny", args.step_ms / 1000)
    else:
        factory = functools.partial(reference_engine, "tiny")
    config = FleetConfig(name=name, tp=1, dp=dp, **extra)
    return Fleet.launch(config, engine_factory=factory)


class Clients:
    """`n` concurrent clients, each sending one request at a time until stopped (asyncio
    tasks over the router, in a thread of their own, so hundreds cost little here); answer
    times and latencies recorded."""

    def __init__(self, fleet, n: int, tokens: int):
        self.router, self.n, self.tokens = fleet.router, n, tokens
        self.answers: list[tuple[float, float, str]] = []  # (time, latency, version)
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()))

    async def _main(self) -> None:
        await asyncio.gather(*(self._client() for _ in range(self.n)))

    async def _client(self) -> None:
        while not self.stop.is_set():
            t = time.monotonic()
            try:
                result = (await self.router.agenerate([PROMPT], self.tokens))[0]
            except Exception as e:  # noqa: BLE001 - counted, reported
                self.errors.append(f"{type(e).__name__}: {e}")
                continue
            now = time.monotonic()
            self.answers.append((now, now - t, result.version))

    def __enter__(self) -> Clients:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=120)

    def window(self, start: float, end: float) -> dict:
        inside = [a for a in self.answers if start <= a[0] <= end]
        times = [start, *(a[0] for a in inside), end]
        return {
            "requests": len(inside),
            "rps": len(inside) / (end - start),
            "p50_ms": 1000 * statistics.median(a[1] for a in inside) if inside else None,
            "longest_gap_s": max(b - a for a, b in zip(times, times[1:])),
            "versions": sorted({a[2] for a in inside}, key=int),
        }


def run_scaling(args) -> list[dict]:
    rows = []
    for dp in args.dps:
        fleet = _launch(f"bench-serve-{dp}", dp, args)
        try:
            fleet.update(_weights(1), version=1)
            with Clients(fleet, args.clients, args.tokens) as clients:
                time.sleep(1.0)  # warm-up
                start = time.monotonic()
                time.sleep(args.seconds)
                row = {"dp": dp, **clients.window(start, time.monotonic())}
            row["errors"] = len(clients.errors)
            rows.append(row)
            print(_scaling_line(row, rows[0]), flush=True)
        finally:
            fleet.shutdown()
    return rows


def run_updates(args) -> list[dict]:
    dp, rows = max(args.dps), []
    for mode in ("all", "rolling"):
        fleet = _launch(f"bench-serve-{mode}", dp, args, update_mode=mode)
        try:
            fleet.update(_weights(1), version=1)
            updates = []
            with Clients(fleet, args.clients, args.tokens) as clients:
                time.sleep(1.0)
                start, version = time.monotonic(), 1
                while time.monotonic() - start < args.seconds:
                    version += 1
                    t = time.monotonic()
                    fleet.update(_weights(version), version=version)
                    updates.append(time.monotonic() - t)
                row = {"mode": mode, "dp": dp, **clients.window(start, time.monotonic())}
            row.update(updates=len(updates), update_s=statistics.median(updates))
            row["errors"] = len(clients.errors)
            rows.append(row)
            print(_update_line(row), flush=True)
        finally:
            fleet.shutdown()
    return rows


@functools.lru_cache(maxsize=8)
def _weights(seed: int) -> dict:
    from fd_ray_sync.engine.reference import init_full_state_dict
    from fd_ray_sync.engine.spec import preset

    return init_full_state_dict(preset("tiny"), seed=seed)


def _scaling_line(row: dict, base: dict) -> str:
    return (
        f"dp={row['dp']}: {row['rps']:7.1f} req/s ({row['rps'] / base['rps']:.2f}x dp=1), "
        f"p50 {row['p50_ms']:.0f} ms, {row['errors']} errors"
    )


def _update_line(row: dict) -> str:
    return (
        f"updates, mode {row['mode']:7s} dp={row['dp']}: {row['updates']} updates "
        f"(median {row['update_s']:.2f}s), {row['requests']} requests answered meanwhile "
        f"({row['rps']:.1f} req/s), longest gap without an answer {row['longest_gap_s']:.2f}s, "
        f"{row['errors']} errors"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fd_ray_sync.bench_serve", description=__doc__)
    p.add_argument("--dps", default="1,2,4", help="fleet sizes (replicas, tp=1)")
    p.add_argument("--clients", type=int, default=256, help="concurrent clients")
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per row")
    p.add_argument("--tokens", type=int, default=8, help="tokens generated per request")
    p.add_argument("--engine", choices=("paced", "reference"), default="paced")
    p.add_argument("--step-ms", type=float, default=20.0, help="paced: wait per token")
    p.add_argument("--no-updates", action="store_true", help="skip the update rows")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.dps = [int(x) for x in args.dps.split(",")]
    import ray

    # Logical CPUs: one per rank of the largest fleet, whatever the cores (they compete).
    ray.init(namespace="fd_ray_sync", include_dashboard=False, num_cpus=max(args.dps) + 2)
    engine = (
        f"paced ({args.step_ms:g} ms a token, CPU free meanwhile)"
        if args.engine == "paced"
        else "reference LM on CPU"
    )
    print(f"engine: {engine}; {args.clients} clients, {args.tokens} tokens a request", flush=True)
    out = {"engine": engine, "args": vars(args), "scaling": run_scaling(args)}
    if not args.no_updates:
        out["updates"] = run_updates(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
