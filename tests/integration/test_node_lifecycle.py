"""Discovery through the DHT, signed records, checkpoints across kill -9 and SIGTERM."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import MODEL, node_config
from procs import Proc, alive, probe, process_tree, run, spawn, start_dht_peer, start_node, train_step, wait_for
from moeswarm.model.directory import find_experts
from moeswarm.protocol.client_dht import IsolatedDHT
from moeswarm.protocol.dht import get_records
from moeswarm.protocol.records import expert_key

D = MODEL["d_model"]


def test_client_finds_every_expert_through_the_dht(node_factory, client_dht):
    a, b = node_factory.all(
        a=dict(experts=["itest.L0.E0", "itest.L0.E1"], swarm="discovery"), b=dict(experts=["itest.L0.E1", "itest.L1.E3"], swarm="discovery")
    )
    # each node stored its records before it reported ready, but another peer may see them a moment later
    uids = ["itest.L0.E0", "itest.L0.E1", "itest.L1.E3", "itest.L1.E0"]
    found = wait_for(lambda: (f := find_experts(client_dht, "discovery", uids)) and len(f["itest.L0.E1"]) == 2 and f["itest.L1.E3"] and f)
    assert {r.endpoint for r in found["itest.L0.E0"]} == {a.ready["endpoint"]}
    assert {r.endpoint for r in found["itest.L0.E1"]} == {a.ready["endpoint"], b.ready["endpoint"]}
    assert {r.endpoint for r in found["itest.L1.E3"]} == {b.ready["endpoint"]}
    assert found["itest.L1.E0"] == []
    assert {r.peer_id for r in found["itest.L0.E1"]} == {a.ready["peer_id"], b.ready["peer_id"]}


def test_a_node_hosting_hundreds_of_experts_announces_them_all(node_factory, client_dht):
    # One announce of 512 records is a request over 16 KiB to the DHT process: before, it read it
    # half-way and died, so a node hosting a whole big model lost its DHT at start.
    model = dict(name="many", d_model=8, d_ff=8, n_layers=16, n_experts=32)
    node = node_factory("many", model=model, swarm="many")
    uids = [f"many.L{layer}.E{expert}" for layer in range(16) for expert in range(32)]
    found = wait_for(lambda: (f := find_experts(client_dht, "many", uids)) and all(f.values()) and f)
    assert all(len(found[uid]) == 1 for uid in uids) and node.popen.poll() is None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_node_listening_everywhere_announces_announce_host(node_factory, client_dht):
    # As on a cloud VM or behind NAT: it binds 0.0.0.0 and tells the swarm where it is reached,
    # here another loopback address (a socket bound to 127.0.0.1 only would refuse 127.0.0.2).
    uid, dht_port = "itest.L0.E2", _free_port()
    node = node_factory("public", experts=[uid], swarm="announce", host="0.0.0.0", announce_host="127.0.0.2", dht_port=dht_port)
    assert node.ready["endpoint"].startswith("127.0.0.2:")
    assert any(maddr.startswith(f"/ip4/127.0.0.2/tcp/{dht_port}/p2p/") for maddr in node.ready["maddrs"]), node.ready["maddrs"]
    [record] = wait_for(lambda: find_experts(client_dht, "announce", [uid])[uid])
    assert record.endpoint == node.ready["endpoint"]
    x = torch.randn(3, D)
    out, _ = run(probe(record.endpoint, MODEL["name"], uid, x))  # the announced address really serves
    assert out.shape == x.shape


def test_a_bootstrap_peer_listening_everywhere_is_joined_at_its_announced_address(tmp_path):
    port = _free_port()
    bootstrap = start_dht_peer(tmp_path / "dht", "--host", "0.0.0.0", "--announce-host", "127.0.0.2", "--port", str(port))
    try:
        [maddr] = [m for m in bootstrap.ready["maddrs"] if m.startswith(f"/ip4/127.0.0.2/tcp/{port}/p2p/")]
        node = start_node(tmp_path / "node", node_config([maddr], experts=["itest.L0.E3"], swarm="bootstrap"))
        try:
            client = IsolatedDHT([maddr])
            try:
                [record] = wait_for(lambda: find_experts(client, "bootstrap", ["itest.L0.E3"])["itest.L0.E3"])
                assert record.endpoint == node.ready["endpoint"]
            finally:
                client.close()
        finally:
            node.kill()
    finally:
        bootstrap.kill()


def test_forged_and_malformed_records_are_dropped(node_factory, client_dht, dht_peer):
    # Own swarm name: other tests' nodes left entries under "default" that live until their TTL.
    node = node_factory("victim", experts=["itest.L0.E0"], swarm="forgery")
    key = expert_key("forgery", "itest.L0.E0")
    # the node stored its record before it reported ready, but another peer may see it a moment later
    (victim_subkey,) = wait_for(lambda: get_records(client_dht, [key])[key])
    forged = dict(peer_id="evil", endpoint="127.0.0.1:1", queue_depth=0, rows_per_s=0.0, version=0)
    attack = dict(
        maddrs=dht_peer.ready["maddrs"], key=key, victim_subkey=victim_subkey.hex(),
        forged=forged, garbage=dict(forged, endpoint="not an endpoint"),
    )
    done = subprocess.run(
        [sys.executable, str(pathlib.Path(__file__).with_name("forge_records.py")), json.dumps(attack)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # Overwriting the victim's entry is refused (the attacker cannot sign for the victim's key);
    # its own entry, with a value that breaks our schema, is stored, but readers must drop it.
    assert result == {"overwrite_accepted": False, "own_accepted": True, "own_subkey": result["own_subkey"]}
    own = bytes.fromhex(result["own_subkey"])
    raw = wait_for(lambda: len(get_records(client_dht, [key])[key]) == 2 and get_records(client_dht, [key])[key])
    assert set(raw) == {victim_subkey, own}
    found = find_experts(client_dht, "forgery", ["itest.L0.E0"])["itest.L0.E0"]
    assert [(r.peer_id, r.endpoint) for r in found] == [(node.ready["peer_id"], node.ready["endpoint"])]


def test_kill9_then_restart_resumes_from_checkpoint(node_factory, tmp_path):
    uid, x = "itest.L1.E1", torch.randn(4, D)
    config = dict(experts=[uid], state_dir=str(tmp_path / "state"), checkpoint_interval_s=0.3)
    config["optimizer"] = dict(name="adam", lr=0.01, update_every=4)
    node = node_factory("n1", **config)
    before, _ = run(probe(node.ready["endpoint"], MODEL["name"], uid, x))
    trained, versions = run(train_step(node.ready["endpoint"], MODEL["name"], uid, x, torch.randn(4, D)))
    assert versions[uid] == 1 and not torch.equal(trained, before)
    checkpoint = tmp_path / "state" / "experts" / f"{uid}.pt"
    wait_for(lambda: "checkpoint written" in node.log, what="a checkpoint after the update")
    time.sleep(0.5)  # let one more interval pass with nothing new: it must not rewrite
    assert node.log.count("checkpoint written") == 1, node.log
    node.kill()

    restarted = node_factory("n2", **config)
    resumed, versions = run(probe(restarted.ready["endpoint"], MODEL["name"], uid, x))
    assert versions[uid] == 1
    assert torch.equal(resumed, trained)
    assert "resumed 1 of 1 experts" in restarted.log
    # Same identity keys: the restarted node rewrites its own DHT entry instead of adding a second
    # one, under the same DHT peer id (peers' routing tables stay right).
    assert restarted.ready["peer_id"] == node.ready["peer_id"] != "" and checkpoint.exists()


def test_no_store_is_refused_after_a_node_restarts_under_its_old_identity(node_factory, client_dht, tmp_path):
    # A node restarted under a new DHT node id lived on under its old one in the bootstrap's routing
    # table, and from there in other peers' lookups: their stores reached it twice, and one copy was
    # refused. `other` joins after the restart (a peer that saw the node die would skip it for a
    # while) and stores 9 records a second (TTL 3 s): 2 s of them all stored is not luck.
    # Own swarm name: no other test's node (dead ones' records live until their TTL) hosts this expert.
    config = dict(experts=["itest.L0.E0"], state_dir=str(tmp_path / "state"), announce_ttl_s=3, swarm="restarts")
    node_factory("n1", **config).kill()
    restarted = node_factory("n2", **config)
    other = node_factory("other", announce_ttl_s=3, swarm="restarts")
    endpoints = lambda: {r.endpoint for r in find_experts(client_dht, "restarts", ["itest.L0.E0"])["itest.L0.E0"]}
    assert wait_for(lambda: endpoints() == {restarted.ready["endpoint"], other.ready["endpoint"]}, what="the new endpoint alone")
    time.sleep(2.0)
    assert "DHT refused" not in other.log + restarted.log


def test_a_checkpoint_writes_only_the_experts_that_changed(node_factory, tmp_path):
    uids, x = ["itest.L0.E0", "itest.L0.E1"], torch.randn(4, D)
    files = [tmp_path / "state" / "experts" / f"{uid}.pt" for uid in uids]
    config = dict(experts=uids, state_dir=str(tmp_path / "state"), checkpoint_interval_s=0.3)
    config["optimizer"] = dict(name="sgd", lr=0.1, update_every=4)
    node = node_factory("n1", **config)
    time.sleep(1.0)  # three intervals: fresh experts are what the seed makes again, nothing to write
    assert not any(file.exists() for file in files) and "checkpoint written" not in node.log
    for i, uid in enumerate(uids):
        _, versions = run(train_step(node.ready["endpoint"], MODEL["name"], uid, x, torch.randn(4, D)))
        assert versions[uid] == 1
        wait_for(lambda: node.log.count("checkpoint written: 1 of 2 experts") == i + 1, what=f"a checkpoint of {uid} alone")
        if i == 0:
            assert not files[1].exists()
            first = files[0].stat().st_mtime_ns
    assert files[0].stat().st_mtime_ns == first  # not rewritten with the second expert
    assert [torch.load(file, weights_only=True)["experts"][uid]["version"] for file, uid in zip(files, uids)] == [1, 1]


def test_a_node_resumes_from_the_single_checkpoint_file_of_older_nodes_and_moves_on(node_factory, tmp_path):
    from moeswarm.node.config import OptimizerConfig
    from moeswarm.node.registry import ExpertRegistry
    from moeswarm.protocol.spec import ModelSpec

    uids, x = ["itest.L0.E0", "itest.L0.E1"], torch.randn(4, D)
    older = ExpertRegistry(ModelSpec(**MODEL), uids, seed=3, optimizer=OptimizerConfig(name="sgd", lr=0.1, update_every=4))
    older.backward(uids[1], torch.randn(4, D), torch.randn(4, D))  # one step, as an older node would have saved it
    expected = older.forward(uids[1], x)
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    torch.save(older.state_dict(), state_dir / "experts.pt")  # the format written before per-expert files
    (state_dir / "experts").mkdir()
    cut_short = state_dir / "experts" / f".{uids[0]}.pt.k3j2.tmp"  # a write that a kill -9 cut short
    cut_short.write_bytes(b"\0" * 1000)

    node = node_factory("n1", experts=uids, state_dir=str(state_dir), checkpoint_interval_s=0.3)
    assert "resumed 2 of 2 experts" in node.log
    assert not cut_short.exists() and "removed 1 unfinished checkpoint writes" in node.log
    out, versions = run(probe(node.ready["endpoint"], MODEL["name"], uids[1], x))
    assert versions[uids[1]] == 1 and torch.equal(out, expected)
    wait_for(lambda: "checkpoint written: 2 of 2 experts" in node.log, what="the experts moved to files of their own")
    assert sorted(path.name for path in (state_dir / "experts").iterdir()) == [f"{uid}.pt" for uid in uids]
    assert not (state_dir / "experts.pt").exists()


def test_a_second_node_on_the_same_state_dir_is_refused(node_factory, tmp_path):
    state = str(tmp_path / "state")
    first = node_factory("n1", experts=["itest.L0.E0"], state_dir=state)
    with pytest.raises(RuntimeError, match=f"state_dir='{state}' is in use by another node \\(pid {first.popen.pid}\\)"):
        node_factory("n2", experts=["itest.L0.E1"], state_dir=state)
    out, _ = run(probe(first.ready["endpoint"], MODEL["name"], "itest.L0.E0", torch.ones(1, D)))  # the first one serves on
    assert out.shape == (1, D)


def test_kill9_of_the_node_alone_takes_its_dht_process_and_p2pd_down(node_factory):
    node = node_factory("lone")
    tree = process_tree(node.popen.pid)
    assert len(tree) == 3, tree  # the node, its DHT process and p2pd
    os.kill(node.popen.pid, signal.SIGKILL)  # not the group: as `kill -9 <pid>` by hand
    node.popen.wait(5)
    wait_for(lambda: not alive(tree), timeout_s=10, what=f"the node's DHT process and p2pd ({alive(tree)}) exiting")


def _dht_and_p2pd(node_pid: int) -> tuple[int, int]:
    """The pids of a node's DHT process and of that process's p2pd."""
    tree = process_tree(node_pid) - {node_pid}
    p2pd = [pid for pid in tree if pathlib.Path(f"/proc/{pid}/comm").read_text().strip() == "p2pd"]
    assert len(tree) == 2 and len(p2pd) == 1, tree
    return (tree - set(p2pd)).pop(), p2pd[0]


@pytest.mark.parametrize("victim", ["dht process", "p2pd"])
def test_node_that_loses_its_dht_stops_with_a_clear_error_and_a_last_checkpoint(node_factory, tmp_path, victim):
    # Before: the node went on serving with its records expiring, logging announce timeouts forever.
    state = tmp_path / "state"
    node = node_factory("n1", experts=["itest.L0.E0"], state_dir=str(state), checkpoint_interval_s=3600)
    dht_pid, p2pd_pid = _dht_and_p2pd(node.popen.pid)
    tree = process_tree(node.popen.pid)
    run(train_step(node.ready["endpoint"], MODEL["name"], "itest.L0.E0", torch.randn(2, D), torch.randn(2, D)))
    assert not list(state.rglob("*.pt"))  # nothing saved yet: a checkpoint below is the one written on the way out
    time.sleep(0.5)  # the DHT process has noticed its p2pd by now (it looks every 50 ms until it does)
    os.kill(dht_pid if victim == "dht process" else p2pd_pid, signal.SIGKILL)
    assert node.popen.wait(15) == 1  # non-zero: systemd's Restart=on-failure starts it again
    expected = "was killed by signal 9" if victim == "dht process" else "exited with code 3: its p2pd daemon died"
    assert f"DHT process (pid {dht_pid}) {expected}" in node.log
    assert "so that a supervisor restarts it" in node.log
    assert list(state.rglob("*.pt"))
    wait_for(lambda: not alive(tree), timeout_s=10, what=f"the node's processes ({alive(tree)}) exiting")


def test_sigterm_stops_within_5s_and_saves_last_updates(node_factory, tmp_path):
    uid, x = "itest.L0.E3", torch.randn(2, D)
    config = dict(experts=[uid], state_dir=str(tmp_path / "state"), checkpoint_interval_s=3600)
    config["optimizer"] = dict(name="sgd", lr=0.1, update_every=1)
    node = node_factory("n1", **config)
    trained, _ = run(train_step(node.ready["endpoint"], MODEL["name"], uid, x, torch.randn(2, D)))
    started = time.monotonic()
    os.kill(node.popen.pid, signal.SIGTERM)
    assert node.popen.wait(10) == 0
    assert time.monotonic() - started < 5.0
    assert "p2pd daemon" not in node.log  # a requested stop of the DHT is not reported as a failure
    restarted = node_factory("n2", **config)
    resumed, versions = run(probe(restarted.ready["endpoint"], MODEL["name"], uid, x))
    assert versions[uid] == 1 and torch.equal(resumed, trained)


def test_node_refuses_a_checkpoint_of_another_model(node_factory, tmp_path):
    state = str(tmp_path / "state")
    node = node_factory("n1", experts=["itest.L0.E0"], state_dir=state)
    run(train_step(node.ready["endpoint"], MODEL["name"], "itest.L0.E0", torch.randn(2, D), torch.randn(2, D)))
    os.kill(node.popen.pid, signal.SIGTERM)
    node.popen.wait(10)
    saved = _state_files(state)
    assert "experts/itest.L0.E0.pt" in saved
    bigger = dict(MODEL, d_ff=MODEL["d_ff"] * 2)
    # Another swarm name: in n1's swarm its DHT record (alive until its TTL) would refuse n2 first.
    with pytest.raises(RuntimeError, match="does not fit this node"):
        node_factory("n2", model=bigger, experts=["itest.L0.E0"], state_dir=state, swarm="other")
    # the refused checkpoint is left exactly as it was (a failed start writes nothing)
    assert _state_files(state) == saved


def _state_files(state_dir: str) -> dict[str, bytes]:
    """Every file of a state directory but its lock (which holds the pid of the last node to start)."""
    root = pathlib.Path(state_dir)
    return {str(path.relative_to(root)): path.read_bytes() for path in root.rglob("*") if path.is_file() and path.name != "lock"}


def test_unreachable_initial_peers_end_the_node_with_a_clear_error(tmp_path):
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump(node_config([]), sort_keys=False))
    nobody = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWNZWax6D2aQHtMZQTu2Arp8Qg34WQY9hUK5xysewWAND7"  # port 1: closed
    cmd = [sys.executable, "-m", "moeswarm.deploy.cli", "node", "--config", str(config), "--initial-peers", nobody]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "moeswarm: the DHT peer did not start" in result.stderr and nobody in result.stderr
    assert "Traceback" not in result.stderr


def _cpus_allowed(pid: int) -> dict[int, str]:
    """Cpus_allowed_list of every thread of a process: {tid: '3'}."""
    allowed = {}
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        allowed[int(task.name)] = next(line.split()[1] for line in status.splitlines() if line.startswith("Cpus_allowed_list:"))
    return allowed


@pytest.mark.skipif(not pathlib.Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_node_pinned_to_a_cpu_keeps_every_thread_and_child_there(node_factory):
    cpu = max(os.sched_getaffinity(0))
    node = node_factory("pinned", cpus=[cpu])
    tree = process_tree(node.popen.pid)
    assert len(tree) == 3, tree  # the node, its DHT child and p2pd: all inherit the pinning
    threads = {pid: _cpus_allowed(pid) for pid in tree}
    assert sum(len(t) for t in threads.values()) > len(tree)  # grpc, the compute thread, ...: many threads
    assert {allowed for t in threads.values() for allowed in t.values()} == {str(cpu)}, threads
    out, _ = run(probe(node.ready["endpoint"], MODEL["name"], "itest.L0.E0", torch.ones(2, D)))  # and it serves as usual
    assert out.shape == (2, D) and torch.isfinite(out).all()


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux only")
def test_a_node_with_sched_batch_runs_every_thread_and_child_as_batch_work(node_factory):
    node = node_factory("batch", sched_batch=True)
    tree = process_tree(node.popen.pid)
    policies = {}
    for pid in tree:
        for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
            try:
                policies[pid, int(task.name)] = os.sched_getscheduler(int(task.name))
            except ProcessLookupError:  # the thread ended meanwhile
                continue
    assert len(policies) > len(tree) and set(policies.values()) == {os.SCHED_BATCH}, policies
    out, _ = run(probe(node.ready["endpoint"], MODEL["name"], "itest.L0.E0", torch.ones(2, D)))  # and it serves as usual
    assert out.shape == (2, D) and torch.isfinite(out).all()


def test_node_pinned_to_a_missing_cpu_stops_with_a_clear_error(tmp_path, cli_here):
    missing = max(os.sched_getaffinity(0)) + 1 if hasattr(os, "sched_getaffinity") else 0
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump(node_config([], cpus=[missing]), sort_keys=False))
    result = cli_here("node", "--config", str(config))  # refused first thing, before the node pins or starts anything
    assert result.returncode != 0
    assert (f"cpus=[{missing}]" in result.stderr and "not available" in result.stderr) or "needs Linux" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_second_dht_peer_on_the_same_key_file_is_refused(tmp_path):
    key = tmp_path / "dht.key"
    first = start_dht_peer(tmp_path / "first", "--identity", str(key))
    try:
        second = spawn(tmp_path / "second", "dht", "--identity", str(key))
        assert second.wait(timeout=60) == 2
        log = (tmp_path / "second" / "log.txt").read_text()
        assert f"--identity {key} is in use by another DHT peer (pid {first.popen.pid})" in log
    finally:
        first.kill()
    again = start_dht_peer(tmp_path / "again", "--identity", str(key))  # free once its holder stopped
    again.kill()


def test_a_dht_peer_on_a_port_in_use_is_refused_not_started_beside_the_other(tmp_path):
    """p2pd listened with SO_REUSEPORT: a second `dht --port P` started on the first one's port, and
    dialers of the first one's multiaddr reached the second (wrong peer id) from then on."""
    first = start_dht_peer(tmp_path / "first")
    try:
        port = first.ready["maddrs"][0].split("/tcp/")[1].split("/")[0]
        second = spawn(tmp_path / "second", "dht", "--port", port)
        try:
            wait_for(lambda: second.poll() is not None or (tmp_path / "second" / "ready.json").exists(), timeout_s=60,
                     what="the second peer failing or starting")
            assert second.poll() == 1, "a second DHT peer started on a port in use"
        finally:
            Proc(second, tmp_path / "second", {}).kill()
        log = (tmp_path / "second" / "log.txt").read_text()
        assert "address already in use" in log and "Traceback" not in log, log
    finally:
        first.kill()


def test_ctrl_c_in_the_nodes_terminal_stops_it_cleanly(tmp_path, request):
    # Ctrl-C signals the whole foreground process group. The p2pd of a node that started a swarm (no
    # initial peers) closed at once, and the node's stop then waited for a DHT that could no longer
    # shut down, and killed it, logging both.
    state = tmp_path / "state"
    config = node_config([], experts=["itest.L0.E0"], state_dir=str(state))
    node = start_node(tmp_path / "n1", config)
    request.addfinalizer(node.kill)
    tree = process_tree(node.popen.pid)
    run(train_step(node.ready["endpoint"], MODEL["name"], "itest.L0.E0", torch.randn(2, D), torch.randn(2, D)))  # something to save
    time.sleep(2.0)  # a node that has run a while: its p2pd is settled
    os.killpg(node.popen.pid, signal.SIGINT)  # the node leads its own group, as a shell's foreground job does
    assert node.popen.wait(15) == 0
    assert "did not shut down" not in node.log and "did not stop" not in node.log and "p2pd daemon" not in node.log, node.log
    assert list(state.rglob("*.pt"))  # the last checkpoint was written
    wait_for(lambda: not alive(tree), timeout_s=10, what=f"the node's processes ({alive(tree)}) exiting")


def test_ctrl_c_while_the_node_starts_stops_it_there_with_code_130(tmp_path):
    # A bootstrap peer that accepts connections and never answers holds the node's DHT join for
    # seconds (about 5 here): the signal comes while the node is starting, not after.
    work = tmp_path / "node"
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        peer = f"/ip4/127.0.0.1/tcp/{silent.getsockname()[1]}/p2p/12D3KooWNZWax6D2aQHtMZQTu2Arp8Qg34WQY9hUK5xysewWAND7"
        work.mkdir()
        (work / "node.yaml").write_text(yaml.safe_dump(node_config([peer], state_dir=str(tmp_path / "state")), sort_keys=False))
        popen = spawn(work, "node", "--config", str(work / "node.yaml"))
        try:
            wait_for(lambda: "from seed 7" in (work / "log.txt").read_text() or popen.poll() is not None, timeout_s=60, what="the start")
            tree = process_tree(popen.pid)  # the node, its DHT child and p2pd
            os.killpg(popen.pid, signal.SIGINT)
            assert popen.wait(30) == 130, (work / "log.txt").read_text()
        finally:
            Proc(popen, work, {}).kill()
    log = (work / "log.txt").read_text()
    assert "stopped while starting" in log and "moeswarm node ready" not in log and "Traceback" not in log, log
    assert not (work / "ready.json").exists()
    wait_for(lambda: not alive(tree), timeout_s=10, what=f"the node's processes ({alive(tree)}) exiting")
