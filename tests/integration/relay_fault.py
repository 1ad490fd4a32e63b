"""Kill the relaying rank in the middle of a pipelined update on a 3-node local cluster.

Run by `test_nodes.py` in its own process (the test session's Ray is a single node):
`python relay_fault.py OUT.json`. The head is the trainer's node (no CPU); each of two rank
nodes hosts one replica (tp=1), so rank 0's node fetches from the trainer's node and rank 0
re-puts every bucket for rank 1's node. The trainer feeds buckets slowly and
SIGKILLs rank 0 after bucket 5; the figures go to OUT.json.
"""

import functools
import json
import os
import signal
import sys
import time

import ray
from ray.cluster_utils import Cluster

from fd_ray_sync.buckets import iter_buckets
from fd_ray_sync.config import FleetConfig, LoadConfig
from fd_ray_sync.engine.synthetic import SyntheticEngine, synthetic_shapes, synthetic_weights
from fd_ray_sync.errors import RankFailed
from fd_ray_sync.fleet import Fleet
from fd_ray_sync.messages import TensorMeta

TOTAL = 48 << 20
BUCKET = 1 << 20


def main(out_path: str) -> None:
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 400 << 20}
    )
    for _ in range(2):
        cluster.add_node(num_cpus=1, object_store_memory=400 << 20)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="fd_ray_sync", log_to_driver=False)
    result: dict = {}
    try:
        config = FleetConfig(
            name="relay-fault",
            tp=1,
            dp=2,
            enable_expert_parallel=False,
            phase_timeout_s=120,
            load=LoadConfig(load_strategy="object_store", bucket_bytes=BUCKET),
        )
        fleet = Fleet.launch(config, engine_factory=functools.partial(SyntheticEngine, TOTAL))
        shapes = synthetic_shapes(TOTAL)
        first = dict(synthetic_weights(shapes, 1))
        fleet.update(first, version=1)
        before = fleet.status()
        result["nodes"] = len({r["node"] for r in before["ranks"]})
        victim = before["ranks"][0]["pid"]
        plans = fleet.shard_plans()
        second = dict(synthetic_weights(shapes, 2))
        announced = [TensorMeta(name=n, shape=a.shape, dtype="float32") for n, a in second.items()]
        killed_at = None

        def slow_buckets():
            nonlocal killed_at
            for meta, arrays in iter_buckets(second, BUCKET, True, [plans[0]]):
                if meta.index == 5:
                    os.kill(victim, signal.SIGKILL)
                    killed_at = time.monotonic()
                time.sleep(0.05)
                yield meta, arrays

        try:
            fleet.push_buckets(slow_buckets(), 2, announced)
            result["error"] = None
        except RankFailed as e:
            result["error"] = type(e).__name__
            result["phase"] = e.phase
            result["lost"] = sorted(e.lost)
        result["seconds_kill_to_error"] = time.monotonic() - killed_at
        after = fleet.status()
        result["version_after"] = after["version"]
        result["same_weights_as_before"] = [r["fingerprint"] for r in after["ranks"]] == [
            r["fingerprint"] for r in before["ranks"]
        ]
        result["victim_replaced"] = after["ranks"][0]["pid"] != victim
        fleet.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
