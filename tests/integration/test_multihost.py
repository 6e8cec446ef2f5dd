"""A swarm spread over "machines": Linux network namespaces on one bridge (tests/integration/netns.py).

The bootstrap DHT peer and two nodes each run in a namespace of their own, at their own address;
the test process (root namespace, one more address on the bridge) is the client. Nothing is on
127.0.0.1, so a wrong announced address, a loopback-only listener or a connection that outlives an
unplugged cable shows up here. Skipped where namespaces cannot be made (not root, no CAP_NET_ADMIN).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
import yaml

import netns
from procs import Proc, ProcGroup, run, start_dht_peer, start_node, train_step, wait_for

if (reason := netns.unavailable_reason()) is not None:
    pytest.skip(reason, allow_module_level=True)

from moeswarm.model.directory import find_experts  # noqa: E402
from moeswarm.model.dispatcher import DispatchConfig  # noqa: E402
from moeswarm.model.local_moe import LocalMoE  # noqa: E402
from moeswarm.model.remote_moe import RemoteMoE  # noqa: E402
from moeswarm.protocol.client_dht import IsolatedDHT  # noqa: E402

D, F, E, K, SEED = 32, 64, 4, 2, 7
SWARM = "lan"
MODEL = dict(name="lan", d_model=D, d_ff=F, n_layers=1, n_experts=E)
NO_UPDATES = dict(name="sgd", lr=0.1, update_every=1_000_000_000)  # outputs stay equal to the local MoE's
DHT_PORT = 31000  # fixed ports are safe: every namespace has its own port space
TIMEOUT_S = 2.0  # deadline of one expert call: a call that waited for an unplugged node takes this long


@pytest.fixture(scope="module")
def lan():
    with netns.Network(4) as net:  # hosts 0-2: the module's swarm; host 3: a node that a test unplugs
        yield net


@pytest.fixture(scope="module")
def swarm(lan, tmp_path_factory):
    """(bootstrap DHT peer, [node binding 0.0.0.0 with announce_host, node binding its own IP])."""
    dht_host, wildcard_host, bound_host = lan.hosts[:3]
    root = tmp_path_factory.mktemp("lan")
    group = ProcGroup()
    try:
        dht = group.add(start_dht_peer(
            root / "dht", "--host", "0.0.0.0", "--announce-host", dht_host.ip, "--port", str(DHT_PORT), prefix=dht_host.prefix
        ))
        common = dict(model=MODEL, experts="all", initial_peers=dht.ready["maddrs"], seed=SEED, torch_threads=1,
                      state_dir=None, swarm=SWARM, optimizer=NO_UPDATES)
        configs = [
            (wildcard_host, dict(common, host="0.0.0.0", announce_host=wildcard_host.ip, port=32000, dht_port=32001)),
            (bound_host, dict(common, host=bound_host.ip)),
        ]
        for i, (host, config) in enumerate(configs):
            (root / f"n{i}").mkdir()
            (root / f"n{i}" / "node.yaml").write_text(yaml.safe_dump(config))
            group.spawn(root / f"n{i}", "node", "--config", str(root / f"n{i}" / "node.yaml"), prefix=host.prefix)
        group.wait_ready()
        yield dht, group.procs[1:]
    finally:
        group.kill()


@pytest.fixture
def pair(swarm):
    """(LocalMoE, RemoteMoE on the swarm from the root namespace), with the same weights."""
    local = LocalMoE(model="lan", layer=0, d_model=D, d_ff=F, n_experts=E, k=K, seed=SEED)
    remote = RemoteMoE(
        model="lan", layer=0, d_model=D, n_experts=E, k=K, initial_peers=swarm[0].ready["maddrs"], swarm=SWARM,
        config=DispatchConfig(timeout_s=TIMEOUT_S),
    )
    try:
        remote.router.load_state_dict(local.router.state_dict())
        yield local, remote
    finally:
        remote.close()


def status(peers: list[str], timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "moeswarm.deploy.cli", "status", "--json", "--swarm", SWARM, "--initial-peers", *peers]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)


def test_every_address_announced_is_the_machines_own(lan, swarm):
    dht, nodes = swarm
    dht_host, wildcard_host, bound_host = lan.hosts[:3]
    assert dht.ready["maddrs"] and all(m.startswith(f"/ip4/{dht_host.ip}/tcp/{DHT_PORT}/p2p/") for m in dht.ready["maddrs"])
    for node, host in zip(nodes, [wildcard_host, bound_host]):
        assert node.ready["endpoint"].startswith(f"{host.ip}:"), node.ready
        assert node.ready["maddrs"] and all(m.startswith(f"/ip4/{host.ip}/tcp/") for m in node.ready["maddrs"]), node.ready
    assert nodes[0].ready["endpoint"] == f"{wildcard_host.ip}:32000"
    assert nodes[0].ready["maddrs"][0].startswith(f"/ip4/{wildcard_host.ip}/tcp/32001/")

    shown = status(dht.ready["maddrs"])
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout)
    endpoints = {node.ready["endpoint"] for node in nodes}
    assert {record["endpoint"] for record in view["nodes"].values()} == endpoints
    assert {uid: {r["endpoint"] for r in records} for uid, records in view["experts"].items()} == {
        f"lan.L0.E{e}": endpoints for e in range(E)
    }


def test_remote_moe_across_machines_equals_local(pair):
    local, remote = pair
    for rows in (1, 16, 300):
        x_local = torch.randn(rows, D, requires_grad=True)
        x_remote = x_local.detach().clone().requires_grad_(True)
        y_local, y_remote = local(x_local), remote(x_remote)
        grad = torch.randn_like(y_local)
        y_local.backward(grad)
        y_remote.backward(grad)
        assert (y_remote - y_local).abs().max() <= 1e-6
        assert (x_remote.grad - x_local.grad).abs().max() <= 1e-6


def train_steps(local: LocalMoE, remote: RemoteMoE, steps: int, rows: int = 8) -> tuple[list[float], list[str]]:
    """`steps` forward+backward calls on `rows` fresh rows: (their durations, s; what went wrong, if anything).
    Each output and input grad must equal the local MoE's (no node steps its optimizer)."""
    durations, problems = [], []
    for step in range(steps):
        x_local = torch.randn(rows, D, requires_grad=True)
        x_remote = x_local.detach().clone().requires_grad_(True)
        y_local = local(x_local)
        y_local.sum().backward()
        started = time.monotonic()
        try:
            y_remote = remote(x_remote)
            y_remote.sum().backward()
        except Exception as e:  # counted, and named in the assertion
            problems.append(f"step {step}: {e}")
            continue
        finally:
            durations.append(time.monotonic() - started)
        if not bool(torch.isfinite(y_remote).all()) or (y_remote - y_local).abs().max() > 1e-6:
            problems.append(f"step {step}: output differs from the local MoE's")
        elif (x_remote.grad - x_local.grad).abs().max() > 1e-6:
            problems.append(f"step {step}: input grad differs from the local MoE's")
        time.sleep(0.05)
    return durations, problems


def preferred_replica(local: LocalMoE, remote: RemoteMoE, nodes: list[Proc]) -> int:
    """Index in `nodes` of the replica the client now prefers, after a few steps (each must succeed):
    the first, made to look fastest. (One ranking, drawn with jitter, could name a replica the client
    then seldom calls, and the test would never see it fail.)"""
    assert train_steps(local, remote, 4)[1] == []
    picker = remote.client.dispatcher.picker
    for _ in range(20):
        picker.on_success(nodes[0].ready["endpoint"], 0.0005)
        picker.on_success(nodes[1].ready["endpoint"], 0.02)
    return 0


def test_replica_behind_a_slow_link_is_hedged_around(lan, swarm, pair):
    """The preferred replica's link limited to 1 Mbit/s (tc tbf): a 512-row forward takes 0.5 s each
    way there. Forwards are hedged to the other replica, which serves the steps; none fails."""
    (local, remote), nodes = pair, swarm[1]
    picker = remote.client.dispatcher.picker
    slow = preferred_replica(local, remote, nodes)
    lan.limit_rate(lan.hosts[1 + slow], "1mbit")
    try:
        durations, problems = train_steps(local, remote, 10, rows=512)
    finally:
        lan.clear_rate(lan.hosts[1 + slow])
    assert problems == []
    assert picker.failures(nodes[slow].ready["endpoint"]) >= 1  # lost its hedges: banned
    assert picker.failures(nodes[1 - slow].ready["endpoint"]) == 0
    assert max(durations) < TIMEOUT_S, durations


def test_unplugged_replica_is_banned_and_used_again_once_plugged_back(lan, swarm, pair):
    """Pull the cable of the replica the client prefers (no FIN, no RST: a black hole), then put it
    back and pull the other one's: every call succeeds, equal to the local MoE, none waits for the
    unplugged node's deadline, and the replica plugged back serves at once."""
    (local, remote), (dht, nodes) = pair, swarm
    picker = remote.client.dispatcher.picker
    unplugged = preferred_replica(local, remote, nodes)
    other = 1 - unplugged
    hosts = {0: lan.hosts[1], 1: lan.hosts[2]}
    endpoints = {i: nodes[i].ready["endpoint"] for i in (0, 1)}
    lan.unplug(hosts[unplugged])
    try:
        durations, problems = train_steps(local, remote, 40)
        assert problems == []
        assert picker.failures(endpoints[unplugged]) >= 1  # it was tried, and banned
        assert max(durations) < TIMEOUT_S, durations  # none waited for the unplugged node's deadline

        # status answers, from the DHT records the unplugged node left (they expire after its TTL)
        shown = status(dht.ready["maddrs"])
        assert shown.returncode == 0, shown.stderr
        assert endpoints[other] in {r["endpoint"] for r in json.loads(shown.stdout)["nodes"].values()}
    finally:
        lan.plug(hosts[unplugged])
    lan.unplug(hosts[other])
    try:
        durations, problems = train_steps(local, remote, 30)
        assert problems == []  # the replica plugged back serves at once: its dead connection was dropped
        assert picker.failures(endpoints[unplugged]) == 0
        assert max(durations) < TIMEOUT_S, durations
    finally:
        lan.plug(hosts[other])


def test_listening_on_every_interface_without_announce_host_is_refused(lan, tmp_path):
    """host 0.0.0.0 would have a node announce an address nobody can reach: the CLI refuses it."""
    host = lan.hosts[1]
    config = dict(model=MODEL, experts="all", host="0.0.0.0", port=0, dht_port=0, initial_peers=[], state_dir=None)
    (tmp_path / "node.yaml").write_text(yaml.safe_dump(config))
    commands = {
        "announce_host": ["node", "--config", str(tmp_path / "node.yaml")],
        "--announce-host": ["dht", "--host", "0.0.0.0", "--port", "33000"],
    }
    for named, args in commands.items():
        run = subprocess.run([*host.prefix, sys.executable, "-m", "moeswarm.deploy.cli", *args],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 2, run.stderr
        assert "0.0.0.0" in run.stderr and named in run.stderr, run.stderr


@pytest.mark.slow  # about 35 s of timeouts (a 10 s connect, hivemind's 5 s store wait): `pytest -m slow`
def test_new_replica_starts_without_waiting_on_a_trained_replica_off_the_network(lan, swarm, tmp_path):
    """A node starting beside a trained replica (version > 0) pulls its weights first. If that
    replica's machine is unplugged (its records outlive it by up to a TTL), each pull's connect
    hangs: it is given up once, and the node's other experts skip that replica."""
    dht, _ = swarm
    peers, uids = dht.ready["maddrs"], [f"lan.L0.E{e}" for e in range(E)]
    config = dict(model=MODEL, experts="all", initial_peers=peers, seed=SEED, torch_threads=1, state_dir=None,
                  swarm="lan-sync", announce_ttl_s=15, optimizer=dict(name="sgd", lr=0.1, update_every=1))
    trained_host, new_host = lan.hosts[3], lan.hosts[2]
    procs: list[Proc] = []
    client_dht = IsolatedDHT(peers)
    try:
        trained = start_node(tmp_path / "trained", dict(config, host=trained_host.ip), prefix=trained_host.prefix)
        procs.append(trained)
        for uid in uids:
            run(train_step(trained.ready["endpoint"], "lan", uid, torch.randn(2, D), torch.randn(2, D)))

        def trained_announced() -> bool:
            found = find_experts(client_dht, "lan-sync", uids)
            return all(records and records[0].version >= 1 for records in found.values())

        wait_for(trained_announced, timeout_s=20, what="trained versions in the DHT")
        lan.unplug(trained_host)
        # a connect timeout per expert would take more than 4 x 10 s before the node serves
        new = start_node(tmp_path / "new", dict(config, host=new_host.ip), prefix=new_host.prefix, timeout_s=35)
        procs.append(new)
        log = new.log
        assert log.count("keeps the weights it has (version 0)") == E, log  # it saw the trained replica
        assert log.count("could not connect within") == 1, log
        assert log.count("did not answer for another expert") == E - 1, log

        def new_announced() -> bool:
            found = find_experts(client_dht, "lan-sync", uids)
            return all(new.ready["endpoint"] in {r.endpoint for r in records} for records in found.values())

        wait_for(new_announced, timeout_s=20, what="the new node's records in the DHT")
    finally:
        lan.plug(trained_host)
        client_dht.close()
        for proc in procs:
            proc.kill()
