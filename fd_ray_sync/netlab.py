"""A shaped multi-node Ray cluster on one machine: every node in a network namespace of its
own, all behind one switch, every link rate-limited (issue 11).

    fdrs-net-<pid>-<token>-sw   bridge br0 ── h  ── eth0 198.18.0.1  fdrs-net-..-h   (head, trainer)
                                           ├─ n1 ── eth0 198.18.0.2  fdrs-net-..-n1  (node1)
                                           └─ n2 ── eth0 198.18.0.3  fdrs-net-..-n2  (node2)

Each link is a veth pair; tbf shapes egress only, so both ends get one: a node's sending on
its `eth0`, what the switch forwards to it on the switch's end. Two nodes talking cross two
tbf queues, and everything a node receives from several peers shares its one link, as on a
real switch. The `<pid>` in every name is the harness owner's: `sweep()` (run by every
harness as it starts) removes what a dead owner left behind.

Ray runs as real nodes, one per namespace (`ray start --block` in a new session, killed
with its process group; never `ray stop`, which would stop every Ray on the machine). The
driver runs in the head namespace through `ShapedNetwork.run` (or `ip netns exec <head_ns>`
with `driver_env()`): RAY_ADDRESS and the cluster's auth token (RAY_AUTH_MODE=token,
RAY_AUTH_TOKEN_PATH) are set. Connect with
`ray.init(address=os.environ["RAY_ADDRESS"], _node_ip_address=HEAD_IP)`; a plain `ray.init()`
finds the head too on Ray 2.60 (it prefers the head among this cluster's local raylets), but
an older Ray guesses the node's address from a route to the internet, which these namespaces
lack. Node i carries the custom resource `{"node<i>": 1}` and the head `{"trainer": 1}`, the
keys `tx_bytes()` uses.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from fd_ray_sync.errors import ConfigError, WeightSyncError
from fd_ray_sync.shm import pid_alive

HEAD_IP = "198.18.0.1"  # 198.18.0.0/15 is reserved for benchmarks (RFC 2544)
GCS_PORT = 46379
DEV = "eth0"  # every member namespace's end of its link
STATE_ROOT = Path("/tmp")  # a short path: Ray's socket paths must fit 107 bytes
TBF_LATENCY_MS = 10  # the most a packet waits in a tbf queue before it is dropped
_NAME = re.compile(r"^fdrs-net-(\d+)-[0-9a-f]{6}(?:-(?:h|sw|n\d+|probe))?$")

# Polled in the head namespace until every node has registered with the GCS.
_WAIT_NODES = """
import sys, time, ray
address, ip, want, deadline = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
while True:
    try:
        ray.init(address=address, _node_ip_address=ip, log_to_driver=False, logging_level="ERROR")
        break
    except Exception:
        if time.time() > deadline:
            raise
        time.sleep(0.5)
while sum(n["Alive"] for n in ray.nodes()) < want and time.time() < deadline:
    time.sleep(0.5)
alive = sum(n["Alive"] for n in ray.nodes())
sys.exit(f"{alive} of {want} nodes registered" if alive < want else 0)
"""


class NetlabError(WeightSyncError, RuntimeError):
    """A namespace, link, qdisc or Ray node of the shaped network could not be set up."""


def _sh(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True)
    if check and done.returncode:
        raise NetlabError(f"`{' '.join(argv)}` failed: {done.stderr.strip()}")
    return done


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _sh(["ip", *args], check)


def _namespaces() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line]


def _kill_namespace_pids(namespaces: list[str], timeout_s: float = 10.0) -> None:
    """SIGKILL every process in `namespaces` (Ray's workers, stray drivers) and wait for them."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = [_ip("netns", "pids", ns, check=False).stdout for ns in namespaces]
        pids = [int(p) for out in found for p in out.split()]
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def sweep() -> list[str]:
    """Remove the namespaces (and their processes) and state folders of every harness whose
    owner process is dead. Returns the namespaces removed."""
    dead = [n for n in _namespaces() if (m := _NAME.match(n)) and not pid_alive(int(m[1]))]
    _kill_namespace_pids(dead)
    for ns in dead:
        _ip("netns", "del", ns, check=False)
    for folder in STATE_ROOT.glob("fdrs-net-*"):
        if (m := _NAME.match(folder.name)) and not pid_alive(int(m[1])):
            shutil.rmtree(folder, ignore_errors=True)
    return dead


def unavailable() -> str | None:
    """None when shaped namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    if _ray_bin() is None:
        return "the `ray` command is not installed next to this Python"
    probe = f"fdrs-net-{os.getpid()}-{secrets.token_hex(3)}-probe"
    try:
        _ip("netns", "add", probe)
        _ip("-n", probe, "link", "add", "name", "br0", "type", "bridge")
        _ip("-n", probe, "link", "add", "name", "a", "type", "veth", "peer", "name", "b")
        _sh(["tc", "-n", probe, "qdisc", "add", "dev", "a", "root", "tbf", "rate", "1gbit"]
            + ["burst", "64kb", "latency", "10ms"])  # fmt: skip
    except NetlabError as e:
        return str(e)
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def _ray_bin() -> str | None:
    return shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")


@contextmanager
def _sigint_deferred():
    """Hold Ctrl-C while tearing down (a half-deleted network is worse than a late stop);
    re-raise it afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda sig, _frame: got.append(sig))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if got:
        raise KeyboardInterrupt


class ShapedNetwork:
    """`nodes` Ray worker nodes and a head, each in its own namespace, each behind a link of
    `link_gbit` (both directions) to one switch; `delay_ms` one way between any two nodes
    (half on each of the two hops; needs the kernel's sch_netem).

        with ShapedNetwork(nodes=2, link_gbit=1.0) as net:
            net.run([sys.executable, "driver.py"])   # in the head namespace, RAY_ADDRESS set
            print(net.tx_bytes())                    # {"trainer": .., "node1": .., ...}
    """

    def __init__(
        self,
        nodes: int,
        link_gbit: float,
        delay_ms: float = 0.0,
        cpus_per_node: int = 1,
        store_bytes: int = 512 << 20,
        head_cpus: int = 0,
    ):
        if not 1 <= nodes <= 250:
            raise ConfigError(f"ShapedNetwork: nodes must be 1..250, got {nodes}")
        if link_gbit <= 0 or delay_ms < 0:
            raise ConfigError(f"ShapedNetwork: link_gbit {link_gbit} must be > 0, delay_ms >= 0")
        self.nodes, self.link_gbit, self.delay_ms = nodes, link_gbit, delay_ms
        self.cpus_per_node, self.store_bytes, self.head_cpus = cpus_per_node, store_bytes, head_cpus
        self.prefix = f"fdrs-net-{os.getpid()}-{secrets.token_hex(3)}"
        self.head_ns, self.switch_ns = f"{self.prefix}-h", f"{self.prefix}-sw"
        self.node_ns = [f"{self.prefix}-n{i}" for i in range(1, nodes + 1)]
        self.address = f"{HEAD_IP}:{GCS_PORT}"
        # name (tx_bytes key, Ray resource) -> (namespace, switch port, address)
        self.members = {"trainer": (self.head_ns, "h", HEAD_IP)}
        for i, ns in enumerate(self.node_ns, start=1):
            self.members[f"node{i}"] = (ns, f"n{i}", f"198.18.0.{i + 1}")
        rate_bytes = link_gbit * 1e9 / 8
        self.burst_bytes = max(int(rate_bytes / 250), 64 << 10)  # a 4 ms bucket, >= a GSO skb
        self.state = STATE_ROOT / self.prefix
        self._procs: list[subprocess.Popen] = []

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> ShapedNetwork:
        sweep()
        try:
            self._build_network()
            self._start_ray()
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._teardown()

    def _build_network(self) -> None:
        self.state.mkdir(mode=0o700)
        (self.state / "token").write_text(secrets.token_hex(32))
        sw = self.switch_ns
        for ns in [sw, *(m[0] for m in self.members.values())]:
            _ip("netns", "add", ns)
            _ip("netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
            _ip("netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
            _ip("-n", ns, "link", "set", "dev", "lo", "up")
        _ip("-n", sw, "link", "add", "name", "br0", "type", "bridge")
        _ip("-n", sw, "link", "set", "dev", "br0", "up")
        for ns, port, addr in self.members.values():
            # `name` always: `ip link add h ...` would read "h" as "help"
            _ip("-n", sw, "link", "add", "name", port, "type", "veth", "peer", "name", DEV)
            _ip("-n", sw, "link", "set", "dev", DEV, "netns", ns)
            _ip("-n", sw, "link", "set", "dev", port, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", DEV)
            _ip("-n", ns, "link", "set", "dev", DEV, "up")
            self._shape(ns, DEV)
            self._shape(sw, port)

    def _shape(self, ns: str, dev: str) -> None:
        tbf = ["tbf", "rate", f"{int(self.link_gbit * 1e9)}bit", "burst", str(self.burst_bytes)]
        tbf += ["latency", f"{TBF_LATENCY_MS}ms"]
        tc = ["tc", "-n", ns, "qdisc", "add", "dev", dev]
        steps = [[*tc, "root", *tbf]]
        if self.delay_ms > 0:  # netem delays, then hands each packet to the tbf below it
            netem = ["netem", "delay", f"{self.delay_ms / 2}ms", "limit", "100000"]
            steps = [[*tc, "root", "handle", "1:", *netem], [*tc, "parent", "1:1", *tbf]]
        for step in steps:
            try:
                _sh(step)
            except NetlabError as e:
                if "netem" not in step:
                    raise
                raise NetlabError(
                    f"delay_ms={self.delay_ms} needs netem, which this kernel refuses "
                    f"(sch_netem not built or loadable): {e}"
                ) from None

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.state / "token"),
            RAY_USAGE_STATS_ENABLED="0",
        )
        return env

    def driver_env(self) -> dict[str, str]:
        """This process's environment plus what a driver in the head namespace needs:
        RAY_ADDRESS, RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH (the harness's token)."""
        return {**self._env(), "RAY_ADDRESS": self.address}

    def _start_ray(self, timeout_s: float = 120.0) -> None:
        ray = _ray_bin()
        common = ["--block", "--object-store-memory", str(self.store_bytes)]
        common += ["--disable-usage-stats"]
        for name, (ns, _, addr) in self.members.items():
            if name == "trainer":
                role = ["--head", "--port", str(GCS_PORT), "--include-dashboard=false"]
                role += ["--num-cpus", str(self.head_cpus)]
            else:
                role = ["--address", self.address, "--num-cpus", str(self.cpus_per_node)]
            argv = ["ip", "netns", "exec", ns, ray, "start", *role, *common]
            argv += ["--node-ip-address", addr, "--temp-dir", str(self.state / name)]
            argv += ["--resources", json.dumps({name: 1})]
            with open(self.state / f"{name}.log", "wb") as log:
                # a session of its own: Ctrl-C does not reach it, and killpg ends all of it
                self._procs.append(
                    subprocess.Popen(argv, env=self._env(), stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=log, start_new_session=True)
                )  # fmt: skip
        # Poll from the head namespace until every node registered; a node that exits
        # first fails the start at once.
        argv = [sys.executable, "-c", _WAIT_NODES, self.address, HEAD_IP]
        argv += [str(len(self.members)), str(time.time() + timeout_s)]
        waiter = subprocess.Popen(
            ["ip", "netns", "exec", self.head_ns, *argv], env=self.driver_env(),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            while waiter.poll() is None and all(p.poll() is None for p in self._procs):
                time.sleep(0.2)
        finally:
            waiter.kill()
            why = waiter.communicate()[1].strip()[-2000:]
        if waiter.returncode != 0:
            codes = {name: p.poll() for name, p in zip(self.members, self._procs)}
            raise NetlabError(
                f"the shaped cluster did not come up (exit codes of the nodes' `ray start`: "
                f"{codes}): {why}\n{self._log_tails()}"
            )

    def _log_tails(self, lines: int = 15) -> str:
        tails = []
        for name in self.members:
            log = self.state / f"{name}.log"
            text = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else []
            tails.append(f"--- {name} ({log}):\n" + "\n".join(text))
        return "\n".join(tails)

    def _teardown(self) -> None:
        with _sigint_deferred():
            for proc in self._procs:  # each `ray start --block` leads its own session
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            mine = [n for n in _namespaces() if n.startswith(f"{self.prefix}-")]
            _kill_namespace_pids(mine)  # what left the groups: Ray's workers, drivers
            for proc in self._procs:
                proc.wait()
            self._procs.clear()
            for ns in mine:
                _ip("netns", "del", ns, check=False)
            shutil.rmtree(self.state, ignore_errors=True)

    # -- use -----------------------------------------------------------------------------

    def run(
        self,
        argv: list[str],
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess:
        """Run `argv` in the head namespace with RAY_ADDRESS and Ray's auth token set (plus
        `env`); output captured as text. Raises NetlabError naming the exit status and the
        end of stderr when `check` and it fails."""
        full = {**self.driver_env(), **(env or {})}
        cmd = ["ip", "netns", "exec", self.head_ns, *argv]
        done = subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode:
            raise NetlabError(
                f"{argv[0]} in {self.head_ns} exited {done.returncode}: "
                f"{done.stderr.strip()[-3000:]}"
            )
        return done

    def tx_bytes(self) -> dict[str, int]:
        """Bytes each member has sent on its link so far, Ray's control traffic included,
        from the kernel's counters (callable from any namespace). The counters see GSO
        packets, one set of headers per up to 64 KiB: a bulk transfer counts ~0.2% over its
        payload, while tbf charges every 1514-byte frame (~4.6% over at MTU 1500)."""
        sent = {}
        for name, (ns, _, _) in self.members.items():
            stats = json.loads(_ip("-n", ns, "-s", "-j", "link", "show", "dev", DEV).stdout)
            sent[name] = stats[0]["stats64"]["tx"]["bytes"]
        return sent

    def describe(self) -> dict:
        keys = ("nodes", "prefix", "address", "head_ns", "switch_ns", "node_ns", "link_gbit")
        keys += ("delay_ms", "burst_bytes", "cpus_per_node", "head_cpus", "store_bytes")
        return {k: getattr(self, k) for k in keys} | {
            "addresses": {name: m[2] for name, m in self.members.items()},
            "delay_applied": self.delay_ms > 0,  # a refused netem raised in __enter__
            "tbf_latency_ms": TBF_LATENCY_MS,
        }
