"""GPU placement without GPUs: ranks sharing their GPU with a trainer actor, and seeing the
whole node's GPUs (`gpus_per_rank`, `gpu_visibility`).

Ray's scheduling of GPUs needs no GPU hardware. A Ray instance of its own, started in a
child process with 2 logical GPUs, runs a real GPU fleet (`use_gpu` decided by the cluster,
tp=1, dp=2, a torch engine whose parameters stay on the CPU: nothing here touches CUDA)
with `gpus_per_rank=0.5` and `gpu_visibility="node"`. A trainer actor placed in replica 0's
bundle shares that rank's GPU; it connects to the fleet by name, registers its weights and
updates both replicas over the ipc transport. A replica of two ranks needs NCCL, so its
placement (two whole-GPU bundles, a rank and a trainer sharing each) is checked with plain
actors placed the same way. What CUDA then makes of the visibility
(device 0 is the rank's own GPU, peers reachable) needs a GPU node.
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
import functools, json, os, sys
import ray, torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from fd_ray_sync import ipc, shm
from fd_ray_sync.checksum import fingerprint
from fd_ray_sync.config import FleetConfig, LoadConfig
from fd_ray_sync.engine.reference import init_full_state_dict
from fd_ray_sync.engine.torch_engine import torch_lm_engine
from fd_ray_sync.engine.torch_model import TINY_DENSE
from fd_ray_sync.fleet import Fleet

ray.init(address="local", num_cpus=4, num_gpus=4, include_dashboard=False,
         _temp_dir=sys.argv[1], namespace="fd_ray_sync", logging_level="ERROR")
fleet = Fleet.launch(
    FleetConfig(name="colocated", tp=1, dp=2, gpus_per_rank=0.5, gpu_visibility="node",
                load=LoadConfig(load_strategy="ipc")),
    engine_factory=functools.partial(torch_lm_engine, config=TINY_DENSE),
)

@ray.remote
class Trainer:
    def gpus(self):
        return [str(g) for g in ray.get_gpu_ids()]

    def step(self, seed, version):
        fleet = Fleet.connect("colocated")
        weights = ipc.share({n: torch.from_numpy(a) for n, a in
                             init_full_state_dict(TINY_DENSE, seed).items()})
        registered = fleet.register(weights)
        try:
            report = fleet.update(registered, version=version)
            want = fingerprint((n, "float32", t.numpy()) for n, t in weights.items())
        finally:
            for name in {registered.segment_of(n) for n in weights}:
                shm.unlink(name)
        return {"use_gpu": fleet.config.use_gpu, "version": report.version, "want": want}

pg = fleet.placement_groups()[0]
trainer = Trainer.options(
    num_cpus=0, num_gpus=0.5, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, 0)
).remote()
step = ray.get(trainer.step.remote(7, 1), timeout=120)  # placed beside the rank, or fails
ranks = fleet.status()["ranks"]
out = {
    "launched_use_gpu": fleet.config.use_gpu,
    "trainer_gpus": ray.get(trainer.gpus.remote()),
    "step": step,
    "ranks": [{k: r[k] for k in ("gpus", "visible_gpus", "fingerprint", "version")}
              for r in ranks],
}
fleet.shutdown()

# The fleet's placement for tp=2 (its replicas above have one rank each; a fleet of two
# ranks needs NCCL on GPUs): two whole-GPU bundles, a rank and a trainer sharing each.
from ray.util.placement_group import placement_group
pg = placement_group([{"GPU": 1, "CPU": 1}] * 2, strategy="STRICT_PACK")
assert pg.wait(60)
on = lambda i, cpus: Trainer.options(
    num_cpus=cpus, num_gpus=0.5, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i))
out["tp2_ranks"] = ray.get([on(i, 1).remote().gpus.remote() for i in range(2)])
out["tp2_trainers"] = ray.get([on(i, 0).remote().gpus.remote() for i in range(2)])
print("RESULT " + json.dumps(out))
"""


def test_a_trainer_actor_shares_a_rank_gpu_and_feeds_ranks_that_see_the_node():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    with tempfile.TemporaryDirectory(prefix="fdrs-", dir="/tmp") as temp:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, temp], env=env, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    got = json.loads(lines[0][len("RESULT ") :])
    assert got["launched_use_gpu"] is True  # decided by the cluster, known to the driver
    assert got["step"]["use_gpu"] is True  # and to a trainer that connects by name
    ranks = got["ranks"]
    owners = [r["gpus"] for r in ranks]
    assert len({o[0] for o in owners}) == 2 and all(len(o) == 1 for o in owners)
    assert got["trainer_gpus"] == owners[0]  # the trainer sits on replica 0's GPU
    for r in ranks:
        assert r["visible_gpus"].split(",")[0] == r["gpus"][0]  # device 0: its own GPU
        assert sorted(r["visible_gpus"].split(",")) == ["0", "1", "2", "3"]  # and the node's
        assert r["version"] == "1" and r["fingerprint"] == got["step"]["want"]
    # Two TP ranks of one replica on two GPUs, each beside the trainer of its bundle (Ray
    # issues #29811 / #48685 saw fractional GPUs of different bundles share one GPU).
    assert got["tp2_ranks"][0] != got["tp2_ranks"][1]
    assert got["tp2_trainers"] == got["tp2_ranks"]


def test_own_first_orders_the_node_and_refuses_a_foreign_gpu():
    assert own_first("2", None, 4) == "2,0,1,3"
    assert own_first("1", "3,1,0,2", 0) == "1,3,0,2"  # the raylet's own list, reordered
    assert own_first("GPU-b", "GPU-a, GPU-b", 0) == "GPU-b,GPU-a"
    assert own_first("0", None, 1) == "0"
    with pytest.raises(StateError, match="GPU '5'.*not one of this node's GPUs"):
        own_first("5", "0,1", 2)
