"""The transports over a shaped network (issue 11): `fd-ray-sync bench --nodes 2 --link-gbit`
builds two rank nodes (two replicas each) and a trainer node in network namespaces behind
rate-limited links and runs the collective broadcast, the object-store relay and naive Ray
side by side. The bytes each node sent are its link's kernel counter. No timing is
asserted: the figures are printed (and kept in docs/benchmarks.md from bigger runs)."""

import json
import subprocess
import sys

import pytest

from fd_ray_sync.netlab import unavailable

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(unavailable() is not None, reason=f"no namespaces: {unavailable()}"),
]


def test_the_collective_sends_one_model_out_of_the_trainers_node_and_along_a_chain(tmp_path):
    out = tmp_path / "net.json"
    cmd = [sys.executable, "-m", "fd_ray_sync.cli", "bench", "--nodes", "2"]
    cmd += ["--link-gbit", "0.5", "--size-gb", "0.03", "--tp", "1", "--runs", "1"]
    cmd += ["--replicas-per-node", "2"]
    cmd += ["--bucket-mb", "8", "--json", str(out)]
    done = subprocess.run(cmd, timeout=600, cwd=tmp_path, capture_output=True, text=True)
    print(done.stdout)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())["nodes"]["2"]
    model, methods = result["model_bytes"], result["methods"]
    assert set(methods) == {"collective", "object_store_relay", "naive_ray"}
    assert all(m["bit_identical"] for m in methods.values()), methods
    for name in ("collective", "object_store_relay"):
        sent = methods[name]["sent_by_node_bytes"]
        # One copy leaves the trainer's node; the first rank node hands its copy on.
        assert 0.95 <= sent["trainer"] / model <= 1.1, (name, sent)
        handed_on = sorted(b for n, b in sent.items() if n != "trainer")
        assert handed_on[0] < 0.1 * model and 0.95 * model <= handed_on[1] <= 1.1 * model
    # A replica rebuilt after the collective's runs loads from the peer on its own node: no
    # node sends more than control traffic meanwhile (the trainer's least of all).
    collective = methods["collective"]
    assert collective["rebuilt_bit_identical"], collective.get("rebuild_error")
    assert max(collective["rebuild_sent_bytes"].values()) < 0.05 * model, collective
    # Naive Ray: both rank nodes fetch the model from the trainer's node.
    assert methods["naive_ray"]["sent_by_node_bytes"]["trainer"] >= 1.9 * model
