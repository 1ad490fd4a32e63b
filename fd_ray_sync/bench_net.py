"""`fd-ray-sync bench --nodes N --link-gbit B`: the transports over a shaped network.

A `fd_ray_sync.netlab.ShapedNetwork` on this machine: a head node (the trainer's; no rank
lands there) and N rank nodes, each in its own network namespace behind a link of B Gbit/s
(tbf on both ends). This process builds it (root), then runs the measuring driver in the
head namespace (`python -m fd_ray_sync.bench_net --driver CONFIG`), which for each method
launches one replica of `tp` ranks per rank node and times the same updates:

- collective: our weight-sync group, buckets forwarded in pieces along a chain of nodes;
- object_store_relay: our pipelined object-store buckets, relayed node to node;
- naive_ray: `ray.put(state_dict)`, every rank `ray.get`s it and takes its slices.

Bytes each node sent come from its link's kernel counter (Ray's control traffic included).
The bandwidth floor: every rank node must receive one model through its own link, so no
method can beat model_bytes / (link rate x 1448/1514, the payload share of a full frame).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

GiB = 1 << 30
PAYLOAD = 1448 / 1514  # TCP payload per frame a tbf-shaped link carries (MTU 1500)
METHODS = ("collective", "object_store_relay", "naive_ray")


class LinkMeter:
    """Bytes each member of a shaped network has sent on its link (kernel counters, read
    with `ip -n NS`, so from any namespace)."""

    def __init__(self, members: dict[str, str], dev: str):
        self.members, self.dev = members, dev

    def read(self) -> dict[str, float]:
        out = {}
        for name, ns in self.members.items():
            cmd = ["ip", "-n", ns, "-s", "-j", "link", "show", "dev", self.dev]
            stats = json.loads(subprocess.run(cmd, check=True, capture_output=True).stdout)
            out[name] = float(stats[0]["stats64"]["tx"]["bytes"])
        return out

    def settled(self, timeout_s: float = 0.0) -> dict[str, float]:
        return self.read()  # counters are exact at any moment; the update has returned


def run_shaped(
    size_gb: float,
    tp: int,
    nodes: int,
    link_gbit: float,
    runs: int,
    bucket_mb: int,
    methods: list[str],
    delay_ms: float = 0.0,
    replicas_per_node: int = 1,
) -> dict:
    """Build the network, run the driver in its head namespace, tear it down; the results."""
    from fd_ray_sync.bench_setup import Setup
    from fd_ray_sync.netlab import DEV, ShapedNetwork, unavailable

    reason = unavailable()
    if reason:
        raise SystemExit(f"cannot build a shaped network here: {reason}")
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}; known: {', '.join(METHODS)}")
    setup = Setup(size_gb, tp, nodes * replicas_per_node)
    store = int(setup.model_bytes * (1.5 + replicas_per_node)) + (256 << 20)
    cpus = tp * replicas_per_node
    with tempfile.TemporaryDirectory(prefix="fdrs-net-bench-") as tmp:
        net = ShapedNetwork(nodes, link_gbit, delay_ms, cpus_per_node=cpus, store_bytes=store)
        with net:
            members = {name: m[0] for name, m in net.members.items()}
            config = {
                "size_gb": size_gb,
                "tp": tp,
                "nodes": nodes,
                "replicas_per_node": replicas_per_node,
                "runs": runs,
                "bucket_mb": bucket_mb,
                "methods": methods,
                "members": members,
                "dev": DEV,
                "network": net.describe(),
                "out": os.path.join(tmp, "out.json"),
            }
            path = os.path.join(tmp, "config.json")
            with open(path, "w") as f:
                json.dump(config, f)
            done = net.run([sys.executable, "-m", "fd_ray_sync.bench_net", "--driver", path])
            print(done.stdout, end="", flush=True)
            with open(config["out"]) as f:
                return json.load(f)


def _drive(config: dict) -> dict:
    """In the head namespace: every method over the shaped network, side by side."""
    import ray

    from fd_ray_sync.bench_nodes import _naive, _ours
    from fd_ray_sync.bench_setup import Setup
    from fd_ray_sync.netlab import HEAD_IP

    ray.init(
        address=os.environ["RAY_ADDRESS"],
        _node_ip_address=HEAD_IP,
        namespace="fd_ray_sync",
        log_to_driver=False,
    )
    per_node = config.get("replicas_per_node", 1)
    setup = Setup(config["size_gb"], config["tp"], config["nodes"] * per_node)
    meter = LinkMeter(config["members"], config["dev"])
    # tbf charges whole frames: at MTU 1500, 1448 payload bytes of every 1514 (netlab).
    link_bytes_s = config["network"]["link_gbit"] * 1e9 / 8 * PAYLOAD
    floor = setup.model_bytes / link_bytes_s
    bucket = config["bucket_mb"] << 20
    runs = config["runs"]
    print(
        f"{config['nodes']} rank nodes x {per_node} replica(s) x tp={config['tp']}, links "
        f"{config['network']['link_gbit']} Gbit/s, model {setup.model_bytes / GiB:.3f} GiB: "
        f"floor {floor:.3f}s",
        flush=True,
    )
    results = {}
    for name in config["methods"]:
        start = time.perf_counter()
        try:
            if name == "naive_ray":
                r = _naive(setup, meter, runs)
            else:
                strategy = "collective" if name == "collective" else "object_store"
                # After the collective's runs: a replica rebuilt, loading from its peer.
                rebuild = name == "collective" and config["nodes"] >= 2
                r = _ours(setup, meter, runs, True, bucket, strategy, rebuild)
        except Exception as e:  # noqa: BLE001 - one method's failure is a result
            r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
        if "times" in r:
            r["seconds"] = statistics.median(r["times"])
            r["x_floor"] = r["seconds"] / floor
            r["sent_by_node_bytes"] = {
                n: statistics.median(s[n] for s in r["sent"]) for n in r["sent"][0]
            }
            r["trainer_node_sent_x_model"] = r["sent_by_node_bytes"]["trainer"] / setup.model_bytes
        r["wall_s"] = time.perf_counter() - start
        results[name] = r
        print(_row(name, r), flush=True)
    naive = results.get("naive_ray", {}).get("seconds")
    for name, r in results.items():
        if naive and r.get("seconds") and name != "naive_ray":
            r["speedup_vs_naive"] = naive / r["seconds"]
            print(f"{name} vs naive_ray x{r['speedup_vs_naive']:.2f}", flush=True)
    out = {
        "link_gbit": config["network"]["link_gbit"],
        "delay_ms": config["network"]["delay_ms"],
        "tp": config["tp"],
        "replicas_per_node": per_node,
        "relay_widened": True,  # the relay's window grows with its chain (scale.model)
        "bucket_mb": config["bucket_mb"],
        "piece_mb": _piece_mb(),
        "runs": runs,
        "network": config["network"],
        "nodes": {
            str(config["nodes"]): {
                "model_bytes": setup.model_bytes,
                "floor_s": floor,
                "methods": results,
            }
        },
    }
    with open(config["out"], "w") as f:
        json.dump(out, f, indent=2)
    return out


def _piece_mb() -> float:
    from fd_ray_sync.collective import PIECE_BYTES

    return PIECE_BYTES / (1 << 20)


def _row(name: str, r: dict) -> str:
    if "error" in r:
        return f"  {name:20s} {r['error']}"
    by_node = " ".join(f"{n} {b / GiB:.2f}" for n, b in r["sent_by_node_bytes"].items())
    rebuilt = ""
    if r.get("rebuild_error"):
        rebuilt = f"\n  {'':20s} the replica rebuilt from its peer is down: {r['rebuild_error']}"
    elif "rebuild_s" in r:
        rebuilt = (
            f"\n  {'':20s} a replica rebuilt from its peer in {r['rebuild_s']:.3f}s (its load "
            f"{r['peer_restore_s']:.3f}s; the push took {r['seconds']:.3f}s), trainer node "
            f"sent {r['rebuild_sent_bytes']['trainer'] / GiB:.3f} GiB meanwhile, "
            f"bit-identical {r['rebuilt_bit_identical']}"
        )
    return (
        f"  {name:20s} {r['seconds']:7.3f}s (x{r['x_floor']:.2f} floor)  trainer node sent "
        f"x{r['trainer_node_sent_x_model']:.2f} model  sent by node [GiB]: {by_node}  "
        f"bit-identical {r['bit_identical']}{rebuilt}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fd_ray_sync.bench_net")
    p.add_argument("--driver", required=True, help="the config a ShapedNetwork bench wrote")
    args = p.parse_args(argv)
    with open(args.driver) as f:
        _drive(json.load(f))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
