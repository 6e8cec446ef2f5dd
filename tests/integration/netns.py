"""Linux network namespaces joined by a bridge: "machines" with their own addresses for multi-host tests.

    with Network(3) as net:                      # hosts net.hosts[0..2] at 10.213.X.2-4, root ns at .1
        proc = start_node(dir, config, prefix=net.hosts[1].prefix)   # runs inside that namespace
        net.unplug(net.hosts[1])                 # cable pulled: its packets vanish, no RST, no ICMP
        net.plug(net.hosts[1])

Neighbour (ARP) entries are static, so an unplugged host is a black hole like a dead machine on the
internet, not a LAN host whose failed ARP makes connects fail fast with EHOSTUNREACH. Needs root
(CAP_NET_ADMIN); `unavailable_reason()` says why a test should skip instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import ipaddress
import os
import re
import signal
import subprocess

SUBNET_PREFIX = "10.213"  # 10.213.X.0/24, X free among this machine's routes
LOCK_PATH = "/tmp/moeswarm-netns.lock"  # concurrent test runs pick their subnets one at a time
NS_PREFIX = "moeswarm-"  # namespaces moeswarm-{pid}-{i}; links msw{pid}b (bridge), msw{pid}h{i} (bridge ports)
IP_TIMEOUT_S = 10.0


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`ip ARGS`; check: a failure raises with what ip said (CalledProcessError's message leaves it out)."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (not root, no `ip`, no CAP_NET_ADMIN), or None."""
    if os.geteuid() != 0:
        return "network namespace tests need root (CAP_NET_ADMIN)"
    probe = f"{NS_PREFIX}{os.getpid()}-probe"
    try:
        made = ip("netns", "add", probe, check=False)
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        return f"iproute2 `ip` unusable: {e}"
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    ip("netns", "delete", probe, check=False)
    return None


@dataclasses.dataclass(frozen=True)
class Host:
    """One namespace: a "machine" with one interface (eth0) on the bridge."""

    name: str  # namespace name
    ip: str  # its address on the bridge's /24
    port_link: str  # its bridge port (root side of its veth pair): down = cable unplugged

    @property
    def prefix(self) -> list[str]:
        """Prepend to a command to run it in this namespace (ip execs it: the pid is the command's)."""
        return ["ip", "netns", "exec", self.name]


class Network:
    """K namespaces on one Linux bridge; the root namespace is on it too (at .1), so the test process
    can act as one more machine. Everything is removed on exit, also when the set-up fails halfway."""

    def __init__(self, n_hosts: int):
        self.n_hosts = n_hosts
        self.tag = f"msw{os.getpid()}"  # interface names must stay under 16 bytes
        self.bridge = f"{self.tag}b"
        self.hosts: list[Host] = []
        self.root_ip = ""

    def __enter__(self) -> "Network":
        remove_stale()
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create(self) -> None:
        with open(LOCK_PATH, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # held until our address is on the bridge: others see it taken
            subnet = _free_subnet()
            ip("link", "add", self.bridge, "type", "bridge")
            self.root_ip = str(subnet[1])
            ip("addr", "add", f"{self.root_ip}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for i in range(self.n_hosts):
            host = Host(f"{NS_PREFIX}{os.getpid()}-{i}", str(subnet[i + 2]), f"{self.tag}h{i}")
            self.hosts.append(host)
            ip("netns", "add", host.name)
            ip("link", "add", host.port_link, "type", "veth", "peer", "name", "eth0", "netns", host.name)
            ip("link", "set", host.port_link, "master", self.bridge, "up")
            ip("-n", host.name, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            ip("-n", host.name, "link", "set", "eth0", "up")
            ip("-n", host.name, "link", "set", "lo", "up")
        self._pin_neighbours()

    def _pin_neighbours(self) -> None:
        """Static ARP everywhere: traffic to an unplugged host is dropped silently, never refused."""
        macs = {None: _mac(None, self.bridge), **{host.name: _mac(host.name, "eth0") for host in self.hosts}}
        places = [(None, self.bridge, self.root_ip)] + [(host.name, "eth0", host.ip) for host in self.hosts]
        for netns, dev, _ in places:
            for other, _, other_ip in places:
                if other != netns:
                    ns_args = ["-n", netns] if netns else []
                    ip(*ns_args, "neigh", "replace", other_ip, "lladdr", macs[other], "dev", dev, "nud", "permanent")

    def run(self, host: Host, *cmd: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess:
        """Run a command in `host`'s namespace to completion (bounded); output captured as text."""
        return subprocess.run([*host.prefix, *cmd], capture_output=True, text=True, timeout=timeout_s)

    def unplug(self, host: Host) -> None:
        """Pull its cable: packets to and from it are dropped, its processes keep running."""
        ip("link", "set", host.port_link, "down")

    def plug(self, host: Host) -> None:
        ip("link", "set", host.port_link, "up")

    def limit_rate(self, host: Host, rate: str, *, burst: str = "32kb", latency: str = "200ms") -> None:
        """Token-bucket limit both directions of its link (tc tbf), e.g. rate="1mbit"."""
        tbf = ["root", "tbf", "rate", rate, "burst", burst, "latency", latency]
        _tc("qdisc", "replace", "dev", host.port_link, *tbf)  # towards the host
        _tc("-n", host.name, "qdisc", "replace", "dev", "eth0", *tbf)  # from it

    def clear_rate(self, host: Host) -> None:
        _tc("qdisc", "del", "dev", host.port_link, "root", check=False)
        _tc("-n", host.name, "qdisc", "del", "dev", "eth0", "root", check=False)

    def close(self) -> None:
        """Kill what still runs in our namespaces, delete them, their links and the bridge. Idempotent."""
        for host in self.hosts:
            _delete_namespace(host.name)
            ip("link", "delete", host.port_link, check=False)  # gone with the namespace already, normally
        ip("link", "delete", self.bridge, check=False)
        self.hosts = []


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.213.X.0/24 that no route or address of the root namespace overlaps."""
    text = ip("-4", "route", "show", "table", "all").stdout + ip("-4", "-o", "addr").stdout
    taken = [ipaddress.ip_network(n, strict=False) for n in re.findall(r"\b\d+\.\d+\.\d+\.\d+(?:/\d+)?", text)]
    start = os.getpid() % 250
    for offset in range(250):
        subnet = ipaddress.ip_network(f"{SUBNET_PREFIX}.{(start + offset) % 250 + 1}.0/24")
        if not any(net.prefixlen > 0 and net.overlaps(subnet) for net in taken):
            return subnet
    raise RuntimeError(f"no free {SUBNET_PREFIX}.X.0/24 subnet")


def _mac(netns: str | None, dev: str) -> str:
    ns_args = ["-n", netns] if netns else []
    return re.search(r"link/ether (\S+)", ip(*ns_args, "link", "show", dev).stdout).group(1)


def _tc(*args: str, check: bool = True) -> None:
    done = subprocess.run(["tc", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    if check and done.returncode != 0:
        raise RuntimeError(f"tc {' '.join(args)}: {done.stderr.strip()}")


def _delete_namespace(name: str) -> None:
    """Kill its processes first: a namespace lives on (and keeps its addresses) while any process uses it."""
    pids = ip("netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    ip("netns", "delete", name, check=False)


def remove_stale() -> None:
    """Namespaces and links of test runs whose process is gone (killed before its cleanup ran)."""
    def dead(pid: str) -> bool:
        return not os.path.exists(f"/proc/{pid}")

    for name in ip("netns", "list", check=False).stdout.split():
        match = re.fullmatch(rf"{NS_PREFIX}(\d+)-\w+", name)
        if match and dead(match.group(1)):
            _delete_namespace(name)
    for link in re.findall(r"^\d+: (msw\d+[bh]\d*)[@:]", ip("-o", "link", check=False).stdout, re.M):
        if dead(re.match(r"msw(\d+)", link).group(1)):
            ip("link", "delete", link, check=False)
