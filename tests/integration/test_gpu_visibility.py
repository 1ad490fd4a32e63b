"""FleetConfig(gpu_visibility="node"): a GPU rank sees every GPU of its node, its own first.

Ray's scheduling of GPUs needs no GPU hardware: a Ray instance of its own, started in a
child process with 4 logical GPUs, places two actors the way a fleet places a replica's
ranks (one placement group, one GPU bundle each, the fleet's `rank_env`), and each runs
`fd_ray_sync.gpus.see_node_gpus` as the rank actor does first thing. What CUDA then makes of
the variable (device 0 = the rank's own GPU, peers reachable) needs a GPU node.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

from fd_ray_sync.errors import StateError
from fd_ray_sync.gpus import own_first

pytestmark = pytest.mark.slow

CHILD = r"""
import json, os, sys
import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from actors.placement import rank_env
from fd_ray_sync.config import FleetConfig
from fd_ray_sync.gpus import see_node_gpus

ray.init(address="local", num_cpus=2, num_gpus=4, include_dashboard=False,
         _temp_dir=sys.argv[1], logging_level="ERROR")

@ray.remote
class Rank:
    def __init__(self):
        see_node_gpus()
    def seen(self):
        return {"assigned": [str(i) for i in ray.get_gpu_ids()],
                "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}

pg = placement_group([{"GPU": 1, "CPU": 1}] * 2, strategy="STRICT_PACK")
assert pg.wait(60)
out = {}
for visibility in ("own", "node"):
    env = rank_env(FleetConfig(gpu_visibility=visibility), use_gpu=True)
    ranks = [Rank.options(num_cpus=1, num_gpus=1, runtime_env={"env_vars": env},
                          scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i)).remote()
             for i in range(2)]
    out[visibility] = ray.get([r.seen.remote() for r in ranks])
    for r in ranks:
        ray.kill(r)
print("RESULT " + json.dumps(out))
"""


def _placed(node_visible: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if node_visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = node_visible  # what the node's raylet starts with
    with tempfile.TemporaryDirectory(prefix="fdrs-", dir="/tmp") as temp:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, temp], env=env, capture_output=True, text=True,
            timeout=180,
        )  # fmt: skip
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(lines[0][len("RESULT ") :])


@pytest.mark.parametrize("node_visible", [None, "3,1,0,2"])
def test_node_visibility_puts_each_rank_own_gpu_first_among_all_of_the_node(node_visible):
    got = _placed(node_visible)
    node = sorted((node_visible or "0,1,2,3").split(","))
    own = got["own"]  # Ray's default: each rank sees its GPU alone
    assert [r["visible"] for r in own] == [r["assigned"][0] for r in own]
    node_ranks = got["node"]
    owners = [r["assigned"][0] for r in node_ranks]
    assert len(set(owners)) == 2
    for r in node_ranks:
        visible = r["visible"].split(",")
        assert visible[0] == r["assigned"][0]  # device 0 is the rank's own GPU
        assert sorted(visible) == node  # and every GPU of the node follows, once


def test_own_first_orders_the_node_and_refuses_a_foreign_gpu():
    assert own_first("2", None, 4) == "2,0,1,3"
    assert own_first("GPU-b", "GPU-a, GPU-b", 0) == "GPU-b,GPU-a"
    assert own_first("0", None, 1) == "0"
    with pytest.raises(StateError, match="GPU '5'.*not one of this node's GPUs"):
        own_first("5", "0,1", 2)
