"""The shaped network harness (fd_ray_sync.netlab): real namespaces, veths, tbf and Ray
nodes. Bytes are the links' own counters; nothing here asserts on time."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from fd_ray_sync import netlab
from fd_ray_sync.shm import pid_alive

UNAVAILABLE = netlab.unavailable()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(UNAVAILABLE is not None, reason=f"{UNAVAILABLE}"),
]

OBJECT_BYTES = 16 << 20

DRIVER = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np, ray

    ray.init(address=os.environ["RAY_ADDRESS"], _node_ip_address="198.18.0.1")

    @ray.remote(num_cpus=0, resources={"node1": 1})
    def make(n):
        return np.arange(n, dtype=np.uint8)

    @ray.remote(num_cpus=0, resources={"node2": 1})
    def take(a):
        return int(a.sum(dtype=np.uint64))

    ref = make.remote(int(sys.argv[1]))
    ray.wait([ref], fetch_local=False)
    start = time.perf_counter()
    total = ray.get(take.remote(ref))
    print(total, time.perf_counter() - start)
    """
)


def _leftovers(prefix: str) -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in listed.splitlines() if line.startswith(f"{prefix}-")]


def _pids_in(namespaces: list[str]) -> list[int]:
    pids = []
    for ns in namespaces:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
        pids += [int(p) for p in out.split()]
    return pids


def test_an_object_from_node1_crosses_node1s_link_and_nothing_is_left(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    with netlab.ShapedNetwork(nodes=2, link_gbit=0.2) as net:
        prefix = net.prefix
        assert sorted(_leftovers(prefix)) == sorted([net.head_ns, net.switch_ns, *net.node_ns])
        before = net.tx_bytes()
        done = net.run([sys.executable, str(driver), str(OBJECT_BYTES)], timeout=120)
        after = net.tx_bytes()
        pids = _pids_in([net.head_ns, *net.node_ns])
    total, seconds = done.stdout.split()[-2:]
    expected = int(sum(i % 256 for i in range(256)) * OBJECT_BYTES // 256)
    assert int(total) == expected
    sent = {name: after[name] - before[name] for name in after}
    print(
        f"{OBJECT_BYTES >> 20} MiB node1 -> node2 at 0.2 gbit: {float(seconds):.2f} s, sent {sent}"
    )
    assert sent["node1"] >= OBJECT_BYTES
    assert sent["trainer"] < OBJECT_BYTES / 10 and sent["node2"] < OBJECT_BYTES / 10
    assert pids and _leftovers(prefix) == []
    assert [p for p in pids if pid_alive(p)] == []
    assert not os.path.exists(net.state)


def test_sweep_removes_the_network_of_a_killed_owner():
    up = "import sys; from fd_ray_sync import netlab\n"
    up += "with netlab.ShapedNetwork(nodes=1, link_gbit=1.0) as net:\n"
    up += "    print(net.prefix, flush=True); sys.stdin.read()\n"
    owner = subprocess.Popen(
        [sys.executable, "-c", up], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        prefix = owner.stdout.readline().strip()
        assert prefix.startswith(f"fdrs-net-{owner.pid}-"), owner.wait(timeout=60)
        namespaces = _leftovers(prefix)
        pids = _pids_in(namespaces)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    assert len(namespaces) == 3 and pids  # a dead owner leaves everything behind ...
    assert all(pid_alive(p) for p in pids)
    swept = netlab.sweep()  # ... until the next harness (or anyone) sweeps
    assert sorted(namespaces) == sorted(n for n in swept if n.startswith(prefix))
    assert _leftovers(prefix) == [] and [p for p in pids if pid_alive(p)] == []


def test_a_delay_is_applied_with_netem_or_refused_naming_it():
    try:
        with netlab.ShapedNetwork(nodes=1, link_gbit=1.0, delay_ms=2.0) as net:
            shown = subprocess.run(
                ["tc", "-n", net.node_ns[0], "qdisc", "show"], capture_output=True, text=True
            ).stdout
            assert net.describe()["delay_applied"] and "netem" in shown
    except netlab.NetlabError as e:
        assert "sch_netem" in str(e)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"fdrs-net-{os.getpid()}-" not in listed
