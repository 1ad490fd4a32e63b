"""`fd-ray-sync bench --nodes 2,4`: bytes that leave the trainer's node, as rank nodes grow.

For each node count N, a fresh local cluster (`ray.cluster_utils.Cluster`) on this machine:
the head node is the trainer's (this process runs there; it offers no CPU, so no rank lands
on it) and N nodes of `tp` CPUs host one replica each (dp = N; a replica's ranks share a
node, as the fleet places them). Every node has its
own raylet and object store, so bytes between them really cross the object managers (over
loopback). Per update, the bytes each node sent are read from that node's own counter
`ray_object_manager_bytes{Type="PushedFromLocalPlasma"}` (its Prometheus endpoint; the
cluster reports every second and the bench waits until the counters settle).

Methods, same model and runs:
- ours, relay: pipelined buckets; the first rank node fetches from the trainer's node, each
  further node from the one before it (one copy leaves the trainer's node);
- ours, no relay: every rank node fetches each bucket from the trainer's node;
- naive Ray: `ray.put(state_dict)`, every rank `ray.get`s it and `set_value`s its slices.
"""

from __future__ import annotations

import functools
import re
import statistics
import time
import urllib.request

import ray

from fd_ray_sync.config import FleetConfig, LoadConfig
from fd_ray_sync.engine.synthetic import SyntheticEngine

GiB = 1 << 30
PUSHED = re.compile(r'^ray_object_manager_bytes\{[^}]*Type="PushedFromLocal(?:Plasma|Disk)"')


def _pushed_bytes(port: int) -> float:
    """Bytes this node's object manager has pushed to other nodes (from memory or disk)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if PUSHED.match(line))


class NodeMeter:
    """Bytes sent by each node of the cluster, from the nodes' own counters."""

    def __init__(self, ports: dict[str, int], report_s: float):
        self.ports, self.report_s = ports, report_s

    def read(self) -> dict[str, float]:
        return {name: _pushed_bytes(port) for name, port in self.ports.items()}

    def settled(self, timeout_s: float = 60.0) -> dict[str, float]:
        """Counters once they have not moved for a few report intervals."""
        last, since = self.read(), time.monotonic()
        deadline = since + timeout_s
        while time.monotonic() < deadline:
            time.sleep(0.25)
            now = self.read()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since > 2.5 * self.report_s:
                break
        return last


def _start_cluster(nodes: int, cpus: int, store_bytes: int):
    from ray.cluster_utils import Cluster

    report_ms = 1000
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "object_store_memory": store_bytes,
            "_system_config": {"metrics_report_interval_ms": report_ms},
        },
    )
    for _ in range(nodes):
        cluster.add_node(num_cpus=cpus, object_store_memory=store_bytes)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="fd_ray_sync", log_to_driver=False)
    alive = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
    ports = {"trainer": alive[cluster.head_node.node_id]["MetricsExportPort"]}
    for i, node in enumerate(cluster.worker_nodes):
        ports[f"node{i + 1}"] = alive[node.node_id]["MetricsExportPort"]
    return cluster, NodeMeter(ports, report_ms / 1000)


def _measured(meter, update) -> tuple[float, dict[str, float]]:
    before = meter.settled()
    start = time.perf_counter()
    update()
    seconds = time.perf_counter() - start
    after = meter.settled()
    return seconds, {n: after[n] - before[n] for n in before}


def _ours(
    setup,
    meter,
    runs: int,
    relay: bool,
    bucket_bytes: int,
    strategy: str = "object_store",
    rebuild: bool = False,
) -> dict:
    """Our fleet, its replicas spread over the rank nodes; `meter.settled()` gives each
    node's sent bytes."""
    from fd_ray_sync.bench_setup import WARMUP
    from fd_ray_sync.fleet import Fleet

    config = FleetConfig(
        name=f"nodes-{strategy}-{'relay' if relay else 'direct'}",
        tp=setup.tp,
        dp=setup.dp,
        enable_expert_parallel=False,
        phase_timeout_s=600,
        load=LoadConfig(load_strategy=strategy, verify_checksum=False, bucket_bytes=bucket_bytes),
        fingerprint=False,
        relay=relay,
    )
    factory = functools.partial(SyntheticEngine, setup.total_bytes)
    fleet = Fleet.launch(config, engine_factory=factory)
    times, sent = [], []
    try:
        for run in range(runs + WARMUP):
            full = dict(setup.weights(run + 1))
            push = functools.partial(fleet.update, full, run + 1, verify_fingerprints=False)
            seconds, bytes_sent = _measured(meter, push)
            del full, push
            if run >= WARMUP:
                times.append(seconds)
                sent.append(bytes_sent)
        ranks = ray.get(fleet.coordinator.rank_handles.remote())
        got = {r["rank"]: r["fingerprint"] for r in ray.get([h.verify.remote() for h in ranks])}
        ok = got == setup.expected_fingerprints(runs + WARMUP)
        extra = _rebuild_from_peer(fleet, meter, setup, runs + WARMUP) if rebuild else {}
    finally:
        fleet.shutdown()
    return {"times": times, "sent": sent, "bit_identical": ok, **extra}


def _rebuild_from_peer(fleet, meter, setup, seed: int) -> dict:
    """Kill the last replica's last rank and heal: the replica is rebuilt (new processes)
    and loads the committed version from a serving replica. Seconds of the whole rebuild,
    of its load from the peer alone, and the bytes each node sent meanwhile."""
    ranks = ray.get(fleet.coordinator.rank_handles.remote())
    ray.kill(ranks[-1], no_restart=True)
    before = meter.settled()
    start = time.perf_counter()
    healed = ray.get(fleet.coordinator.heal.remote())
    seconds = time.perf_counter() - start
    after = meter.settled()
    ranks = ray.get(fleet.coordinator.rank_handles.remote())
    got = {r["rank"]: r["fingerprint"] for r in ray.get([h.verify.remote() for h in ranks])}
    replica = setup.dp - 1
    return {
        "rebuild_s": seconds,
        "peer_restore_s": healed["restore_s"].get(replica),
        "rebuild_sent_bytes": {n: after[n] - before[n] for n in before},
        "rebuilt_bit_identical": healed["replicas_serving"][replica]
        and got == setup.expected_fingerprints(seed),
        "rebuild_error": healed["replica_errors"].get(replica),
    }


def _naive(setup, meter, runs: int) -> dict:
    from fd_ray_sync.bench_baselines import PlainRank, naive_push
    from fd_ray_sync.bench_setup import WARMUP

    world = setup.tp * setup.dp
    ranks = [PlainRank.remote(setup.total_bytes, setup.tp, r) for r in range(world)]
    times, sent = [], []
    try:
        for run in range(runs + WARMUP):
            full = dict(setup.weights(run + 1))
            seconds, bytes_sent = _measured(meter, functools.partial(naive_push, full, ranks))
            del full
            if run >= WARMUP:
                times.append(seconds)
                sent.append(bytes_sent)
        ok = setup.holds(ranks, runs + WARMUP)
    finally:
        for r in ranks:
            ray.kill(r)
    return {"times": times, "sent": sent, "bit_identical": ok}


def run_nodes(size_gb: float, tp: int, node_counts: list[int], runs: int, bucket_mb: int) -> dict:
    from fd_ray_sync.bench_setup import Setup

    out: dict = {"size_gb": size_gb, "tp": tp, "bucket_mb": bucket_mb, "runs": runs, "nodes": {}}
    for nodes in node_counts:
        setup = Setup(size_gb, tp, nodes)
        store = int(setup.model_bytes * 2.5) + (256 << 20)
        cluster, meter = _start_cluster(nodes, tp, store)
        results = {}
        try:
            bucket = bucket_mb << 20
            for name, run, args in (
                ("ours_relay", _ours, (True, bucket)),
                ("ours_no_relay", _ours, (False, bucket)),
                ("naive_ray", _naive, ()),
            ):
                try:
                    r = run(setup, meter, runs, *args)
                except Exception as e:  # noqa: BLE001 - one method's failure is a result
                    r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
                if "times" in r:
                    r["seconds"] = statistics.median(r["times"])
                    trainer = [s["trainer"] for s in r["sent"]]
                    r["trainer_node_sent_bytes"] = statistics.median(trainer)
                    r["trainer_node_sent_x_model"] = statistics.median(trainer) / setup.model_bytes
                    r["sent_by_node_bytes"] = {
                        n: statistics.median(s[n] for s in r["sent"]) for n in r["sent"][0]
                    }
                results[name] = r
                print(_row(nodes, name, r), flush=True)
        finally:
            ray.shutdown()
            cluster.shutdown()
        naive = results.get("naive_ray", {}).get("seconds")
        relay = results.get("ours_relay", {}).get("seconds")
        if naive and relay:
            results["ours_relay_speedup_vs_naive"] = naive / relay
            print(f"{nodes} rank nodes: ours (relay) vs naive_ray x{naive / relay:.2f}")
        out["nodes"][nodes] = {"model_bytes": setup.model_bytes, **results}
    return out


def _row(nodes: int, name: str, r: dict) -> str:
    if "error" in r:
        return f"{nodes} rank nodes  {name:14s} {r['error']}"
    by_node = " ".join(f"{n} {b / GiB:.2f}" for n, b in r["sent_by_node_bytes"].items())
    return (
        f"{nodes} rank nodes  {name:14s} {r['seconds']:7.3f}s  trainer node sent "
        f"{r['trainer_node_sent_bytes'] / GiB:5.2f} GiB (x{r['trainer_node_sent_x_model']:.2f} "
        f"model)  sent by node [GiB]: {by_node}  bit-identical {r['bit_identical']}"
    )
