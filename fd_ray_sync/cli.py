"""The `fd-ray-sync` command: a demo of the whole loop, and commands for a running fleet.

Long work shows progress bars on stderr when it is a terminal (`fd_ray_sync.progress`);
stdout carries the same lines with or without them.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time

from fd_ray_sync.errors import WeightSyncError
from fd_ray_sync.progress import UPDATE_PHASES, Bars, scale_progress, update_progress


def _fleet_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default="fd-ray-sync", help="fleet (coordinator actor) name")
    p.add_argument("--namespace", default="fd_ray_sync", help="Ray namespace of the fleet")
    p.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fd-ray-sync", description="Move trained weights into a running Ray inference fleet."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a small LM and push its weights to a fleet")
    demo.add_argument("--address", default=None, help="join this Ray cluster (default: local)")
    demo.add_argument("--dp", type=int, default=1, help="replicas")
    demo.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks per replica")
    demo.add_argument("--no-experts", action="store_true", help="turn expert parallelism off")
    demo.add_argument("--steps", type=int, default=8, help="train/push steps")
    demo.add_argument("--iters", type=int, default=25, help="optimizer iterations per step")
    demo.add_argument("--prompt", default="The trainer ", help="sample prompt")
    demo.add_argument("--tokens", type=int, default=48, help="tokens per sample")

    launch = sub.add_parser("launch", help="start a detached fleet on a running cluster")
    _fleet_args(launch)
    launch.add_argument("--dp", type=int, default=1)
    launch.add_argument("--tp", type=int, default=2)
    launch.add_argument("--no-experts", action="store_true")
    launch.add_argument("--snapshot", default=None, help="bootstrap from this snapshot folder")
    launch.add_argument(
        "--phase-timeout", type=float, default=120.0, help="seconds each update phase may take"
    )
    launch.add_argument(
        "--shutdown-comm-groups-on-clear",
        action="store_true",
        help="tear TP/EP groups down on clear (FastDeploy's --shutdown-comm-group-if-worker-idle)",
    )

    launch.add_argument(
        "--pause-mode",
        default="wait",
        choices=["abort", "wait", "keep"],
        help="what an update does to the requests in flight (docs/serving.md)",
    )
    launch.add_argument(
        "--rolling",
        type=int,
        default=0,
        metavar="K",
        help="rolling updates, K replicas at a time (default 0: all replicas at once)",
    )

    serve = sub.add_parser("serve", help="HTTP in front of a fleet, on Ray Serve")
    _fleet_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy binds")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--token-file", default=None, help="control token (default: $FD_RAY_SYNC_TOKEN)"
    )
    serve.add_argument(
        "--block", action="store_true", help="stay in the foreground; Ctrl-C removes the app"
    )

    pause = sub.add_parser("pause", help="stop serving until resume (updates still run)")
    _fleet_args(pause)
    pause.add_argument("--mode", default="wait", choices=["abort", "wait", "keep"])
    resume = sub.add_parser("resume", help="serve again after pause")
    _fleet_args(resume)
    sleep = sub.add_parser("sleep", help="free a fleet's weights and/or KV cache until wake-up")
    _fleet_args(sleep)
    sleep.add_argument("--level", type=int, default=1, choices=[1, 2])
    sleep.add_argument("--tags", default=None, help="weights,kv_cache (default both)")
    wake = sub.add_parser("wake-up", help="bring back what sleep freed")
    _fleet_args(wake)
    wake.add_argument("--tags", default=None, help="weights,kv_cache (default both)")

    status = sub.add_parser("status", help="show a fleet's version and each rank's status")
    _fleet_args(status)
    status.add_argument(
        "--json", action="store_true", help="the coordinator's status answer as JSON (scripts)"
    )

    update = sub.add_parser("update", help="load a snapshot folder into a fleet")
    _fleet_args(update)
    update.add_argument("--snapshot", required=True, help="folder of per-rank snapshot files")
    update.add_argument("--version", default=None, help="default: the folder's version.yaml")
    update.add_argument("--force", action="store_true", help="load even if not newer")

    scale = sub.add_parser("scale", help="grow or shrink a fleet to --dp replicas")
    _fleet_args(scale)
    scale.add_argument("--dp", type=int, required=True, help="replicas wanted")

    clear = sub.add_parser("clear", help="free a fleet's weights and KV cache")
    _fleet_args(clear)

    chaos = sub.add_parser("chaos", help="updates under rank and coordinator kills, with figures")
    chaos.add_argument("--updates", type=int, default=20)
    chaos.add_argument("--dp", type=int, default=2)
    chaos.add_argument("--tp", type=int, default=2)
    chaos.add_argument("--kill-interval", type=float, default=6.0, help="mean seconds")
    chaos.add_argument("--no-coordinator-kill", action="store_true")
    chaos.add_argument("--seed", type=int, default=0)
    chaos.add_argument(
        "--transport", default="object_store", choices=["object_store", "collective", "ipc"]
    )
    chaos.add_argument("--json", default=None, help="also write the figures to this file")

    from fd_ray_sync import bench

    bench_parser = sub.add_parser("bench", help="transfer methods side by side, with figures")
    bench.add_arguments(bench_parser)

    shutdown = sub.add_parser("shutdown", help="stop a fleet")
    _fleet_args(shutdown)

    from fd_ray_sync import scale as scale_model

    plan = sub.add_parser("plan", help="one update's time at scale, on paper (a cost model)")
    scale_model.add_arguments(plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        return _COMMANDS[args.command](args)
    except WeightSyncError as e:
        print(f"fd-ray-sync {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def _connect(args):
    from fd_ray_sync.fleet import Fleet

    return Fleet.connect(args.name, args.namespace, args.address)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_status(args) -> int:
    status = _connect(args).status()
    if args.json:
        _print_json(status)
    else:
        from fd_ray_sync.status_table import print_status

        print_status(status)
    return 0


def cmd_update(args) -> int:
    fleet = _connect(args)
    with Bars() as bars:
        bar = bars.task(f"update from {args.snapshot}", len(UPDATE_PHASES))
        with bars.follow(fleet.status, bar, update_progress):
            report = fleet.update_from_snapshot(args.snapshot, args.version, args.force)
        bar.finish(f"version {report.version} committed in {report.total_s:.1f}s")
    _print_json(report.model_dump())
    return 0


def cmd_scale(args) -> int:
    fleet = _connect(args)
    before = fleet.status()
    old = before["dp"]
    with Bars() as bars:
        bar = bars.task(f"scale from dp={old} to dp={args.dp}")
        if args.dp > old:  # new replicas come up, and load the version if the fleet serves
            where = functools.partial(
                scale_progress, old_dp=old, dp=args.dp, loads=bool(before["serving"])
            )
            with bars.follow(fleet.status, bar, where, interval_s=0.5):
                out = fleet.scale(args.dp)
        else:
            out = fleet.scale(args.dp)
        bar.finish(f"scaled to dp={out['dp']}")
    serving = " ".join(str(r) for r, ok in enumerate(out["replicas_serving"]) if ok) or "none"
    print(f"fleet {args.name} scaled from dp={old} to dp={out['dp']}; replicas serving: {serving}")
    return 0


def cmd_serve(args) -> int:
    import ray
    from ray import serve

    from fd_ray_sync.service import app_name, read_token, serve_fleet

    token = read_token(args.token_file)
    ray.init(address=args.address, namespace=args.namespace)
    url = serve_fleet(args.name, args.namespace, token, args.host, args.port)
    print(f"fleet {args.name} served at {url} (control routes need the bearer token)")
    if args.block:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.delete(app_name(args.name))
    return 0


def cmd_pause(args) -> int:
    _print_json(_connect(args).pause(args.mode))
    return 0


def cmd_resume(args) -> int:
    _print_json(_connect(args).resume())
    return 0


def cmd_sleep(args) -> int:
    _print_json(_connect(args).sleep(args.level, args.tags))
    return 0


def cmd_wake_up(args) -> int:
    _print_json(_connect(args).wake_up(args.tags))
    return 0


def cmd_clear(args) -> int:
    _connect(args).clear()
    print(f"fleet {args.name} cleared")
    return 0


def cmd_shutdown(args) -> int:
    _connect(args).shutdown()
    print(f"fleet {args.name} shut down")
    return 0


def cmd_launch(args) -> int:
    from fd_ray_sync.config import FleetConfig, LoadConfig
    from fd_ray_sync.fleet import Fleet

    load = LoadConfig(load_strategy="object_store", model_dir=args.snapshot)
    config = FleetConfig(
        name=args.name,
        namespace=args.namespace,
        dp=args.dp,
        tp=args.tp,
        enable_expert_parallel=not args.no_experts,
        load=load,
        phase_timeout_s=args.phase_timeout,
        shutdown_comm_groups_on_clear=args.shutdown_comm_groups_on_clear,
        pause_mode=args.pause_mode,
        update_mode="rolling" if args.rolling else "all",
        rolling_replicas=max(args.rolling, 1),
        detached=True,
    )
    Fleet.launch(config, address=args.address)
    print(f"fleet {args.name} launched (namespace {args.namespace}); `fd-ray-sync status` shows it")
    return 0


def cmd_demo(args) -> int:
    import ray

    from fd_ray_sync.config import FleetConfig
    from fd_ray_sync.fleet import Fleet

    started = time.perf_counter()
    print(
        f"starting Ray and a fleet of {args.dp} x tp={args.tp} (experts on: {not args.no_experts})"
    )
    with Bars() as bars:
        demo = bars.task("launching the fleet", _demo_total(args.steps))
        ray.init(address=args.address, namespace="fd_ray_sync", log_to_driver=False)
        config = FleetConfig(
            name=f"fd-ray-sync-demo-{int(time.time())}",
            dp=args.dp,
            tp=args.tp,
            enable_expert_parallel=not args.no_experts,
        )
        fleet = Fleet.launch(config)
        try:
            _demo_steps(args, fleet, bars, demo, started)
        finally:
            fleet.shutdown()
            ray.shutdown()
    print(f"demo done in {time.perf_counter() - started:.1f}s")
    return 0


def _demo_total(steps: int) -> int:
    """The demo's steps: the launch, then train, update, generate for each version."""
    return 1 + 3 * (steps + 1)


def _demo_steps(args, fleet, bars: Bars, demo, started: float) -> None:
    from fd_ray_sync.trainer import TinyTrainer

    trainer = TinyTrainer()
    print(f"fleet up in {time.perf_counter() - started:.1f}s; training on: {trainer_text()!r}")
    total = _demo_total(args.steps)
    update = bars.task("update", len(UPDATE_PHASES))  # its phase or buckets, as polled
    for step in range(args.steps + 1):
        demo(1 + 3 * step, total, f"step {step}/{args.steps}: train")
        loss = trainer.train(args.iters) if step else float("nan")
        demo(2 + 3 * step, total, f"step {step}/{args.steps}: update")
        update(0, len(UPDATE_PHASES), f"update to version {step}")
        with bars.follow(fleet.status, update, update_progress, interval_s=0.1):
            report = fleet.update(trainer.weights(), version=step)
        update.finish(f"update: version {report.version} in {report.total_s * 1e3:.0f} ms")
        demo(3 + 3 * step, total, f"step {step}/{args.steps}: generate")
        sample = fleet.generate([args.prompt], args.tokens)[0]
        assert sample.version == str(step), (sample.version, step)
        phases = " ".join(f"{k} {v * 1e3:.0f}" for k, v in report.phase_s.items())
        print(
            f"step {step:2d}/{args.steps}  loss {loss:5.2f}  version {report.version:>2}  "
            f"update {report.total_s * 1e3:4.0f} ms ({phases} ms)"
        )
        print(f"          sample: {args.prompt}{_printable(sample.text)}")
    demo.finish(f"{args.steps + 1} versions pushed and sampled")
    status = fleet.status()
    fps = {r["rank"]: r["fingerprint"] for r in status["ranks"]}
    print(f"fleet version {status['version']}, rank fingerprints {fps}")


def _printable(text: str) -> str:
    """Untrained models emit control bytes; show them as dots so the terminal stays sane."""
    return "".join(c if c.isprintable() else "·" for c in text)


def cmd_chaos(args) -> int:
    from fd_ray_sync.chaos import ChaosConfig, run_chaos

    cfg = ChaosConfig(
        updates=args.updates,
        dp=args.dp,
        tp=args.tp,
        kill_interval_s=args.kill_interval,
        kill_coordinator=not args.no_coordinator_kill,
        seed=args.seed,
        transport=args.transport,
    )
    print(
        f"chaos: {cfg.updates} updates over {cfg.transport} on dp={cfg.dp} x tp={cfg.tp}, "
        "a rank killed every "
        f"~{cfg.kill_interval_s:g}s" + (", the coordinator once" if cfg.kill_coordinator else "")
    )
    with Bars() as bars:
        report = run_chaos(cfg, bars.task("chaos: launching", cfg.updates))
    for key, value in report.model_dump().items():
        print(f"  {key:32s} {value}")
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.model_dump_json(indent=2))
    bad = report.mixed_version_results + report.params_not_matching_committed
    return 1 if bad else 0


def cmd_bench(args) -> int:
    from fd_ray_sync import bench

    with Bars() as bars:
        return bench.run_from_args(args, bars.task("bench: measuring memcpy"))


def trainer_text() -> str:
    from fd_ray_sync.trainer import DEMO_TEXT

    return DEMO_TEXT.strip()[:60] + "..."


_COMMANDS = {
    "demo": cmd_demo,
    "launch": cmd_launch,
    "status": cmd_status,
    "update": cmd_update,
    "clear": cmd_clear,
    "chaos": cmd_chaos,
    "bench": cmd_bench,
    "scale": cmd_scale,
    "serve": cmd_serve,
    "pause": cmd_pause,
    "resume": cmd_resume,
    "sleep": cmd_sleep,
    "wake-up": cmd_wake_up,
    "shutdown": cmd_shutdown,
    "plan": lambda args: __import__("fd_ray_sync.scale").scale.run_from_args(args),
}


if __name__ == "__main__":
    sys.exit(main())
