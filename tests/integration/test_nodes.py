"""Several nodes on one machine (`ray.cluster_utils`, each node its own raylet and object
store): the relay chain sends one model's bytes out of the trainer's node, where fetching
from the trainer sends one per node. Run as `fd-ray-sync bench --nodes 2` in its own
process (the test session's Ray is a single node); bytes are the nodes' own counters."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_the_relay_sends_one_model_out_of_the_trainers_node(tmp_path):
    out = tmp_path / "nodes.json"
    cmd = [sys.executable, "-m", "fd_ray_sync.bench", "--size-gb", "0.02", "--tp", "2"]
    cmd += ["--nodes", "2", "--runs", "1", "--bucket-mb", "4", "--json", str(out)]
    subprocess.run(cmd, check=True, timeout=600, cwd=tmp_path)
    result = json.loads(out.read_text())["nodes"]["2"]
    model = result["model_bytes"]
    relay, direct, naive = result["ours_relay"], result["ours_no_relay"], result["naive_ray"]
    assert all(r["bit_identical"] for r in (relay, direct, naive))
    # Relay: node1 fetched each bucket from the trainer's node and handed it to node2.
    assert 0.95 <= relay["trainer_node_sent_x_model"] <= 1.1
    assert relay["sent_by_node_bytes"]["node1"] >= 0.95 * model
    # Without it, both rank nodes fetched from the trainer's node: two copies left it.
    assert direct["trainer_node_sent_x_model"] >= 1.9
    assert naive["trainer_node_sent_x_model"] >= 1.9
