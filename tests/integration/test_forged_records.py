"""What a peer can do with records it signs itself, against real processes: it must not break
`moeswarm status` (unbounded specs and UID lists), speak under another node's peer id, or keep new
nodes out of the swarm by announcing other shapes for their model."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

import pytest
from conftest import MODEL
from procs import wait_for
from moeswarm.model.directory import find_experts
from moeswarm.protocol.dht import get_records
from moeswarm.protocol.records import expert_key, nodes_key, signer_peer_id

LOAD = dict(endpoint="127.0.0.1:1", queue_depth=0, rows_per_s=0.0)


def forge(dht_peer, key: str, values: list[dict], ttl_s: float = 120.0) -> list[bytes]:
    """Store each value under its own fresh signing key (tests/integration/forge_records.py); returns their subkeys."""
    result = _forger(dict(maddrs=dht_peer.ready["maddrs"], key=key, signed=values, ttl_s=ttl_s))
    assert result["accepted"] == [True] * len(values)  # signed by their own keys: every DHT peer takes them
    return [bytes.fromhex(subkey) for subkey in result["subkeys"]]


def _forger(request: dict) -> dict:
    done = subprocess.run(
        [sys.executable, str(pathlib.Path(__file__).with_name("forge_records.py")), json.dumps(request)],
        capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def status_json(dht_peer, swarm: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "moeswarm.deploy.cli", "status", "--initial-peers", *dht_peer.ready["maddrs"], "--swarm", swarm, "--json"],
        capture_output=True, text=True, timeout=150,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_status_stays_bounded_whatever_node_records_peers_sign(node_factory, client_dht, dht_peer):
    swarm = "status-forgery"
    node = node_factory("honest", experts=["itest.L0.E0", "itest.L0.E1"], swarm=swarm)
    forged = [
        # a spec the old bounds let through: status listed its 1,048,576 experts as missing
        dict(LOAD, peer_id="huge", model=dict(name="huge", d_model=1, d_ff=1, n_layers=1024, n_experts=1024), uids=[]),
        # 100,000 UIDs: status looked each one up and timed out
        dict(LOAD, peer_id="many", model=dict(name="zz", d_model=1, d_ff=1, n_layers=1, n_experts=100_000), uids=dict(model="zz", count=100_000)),
        dict(LOAD, peer_id="malformed", model=dict(name="itest", d_model=32, d_ff=64, n_layers=2, n_experts=4), uids=["itest.L0.E0", "../x"]),
        # within the bounds: read, in lookups small enough for hivemind's pipe (3,000 keys in one broke it)
        dict(LOAD, peer_id="wide", model=dict(name="wide", d_model=1, d_ff=1, n_layers=1, n_experts=3000), uids=dict(model="wide", count=3000)),
    ]
    forge(dht_peer, nodes_key(swarm), forged)
    wait_for(lambda: len(get_records(client_dht, [nodes_key(swarm)])[nodes_key(swarm)] or {}) == 1 + len(forged), what="every node record")
    view = status_json(dht_peer, swarm)
    assert view["nodes"][node.ready["peer_id"]]["endpoint"] == node.ready["endpoint"]
    assert sorted(record["model"]["name"] for record in view["nodes"].values()) == ["huge", "itest", "wide"]
    assert sorted(view["missing"]) == ["itest", "wide"] and view["missing"]["itest"] == ["itest.L1.E0", "itest.L1.E1"]
    assert view["unserved_in_every_layer"] == {"itest": [2, 3]}
    assert len(view["missing"]["wide"]) == 3000 and view["skipped"] == {}
    assert {uid for uid, replicas in view["experts"].items() if replicas} == {"itest.L0.E0", "itest.L0.E1"}


def test_a_peer_cannot_speak_under_another_node_s_peer_id(node_factory, client_dht, dht_peer):
    swarm, uid = "spoof", "itest.L0.E0"
    node = node_factory("real", experts=[uid], swarm=swarm)
    peer_id = node.ready["peer_id"]
    # the node signs with its libp2p key: the peer id its entries derive is the one the DHT knows it by
    (subkey,) = wait_for(lambda: get_records(client_dht, [expert_key(swarm, uid)])[expert_key(swarm, uid)])
    assert signer_peer_id(subkey) == peer_id
    # another key claims the node's peer id for its node entry (it replaced the node's in `status`),
    # and for expert entries the node's own (skipped as itself) and "!" (the averaging leader)
    (spoof,) = forge(dht_peer, nodes_key(swarm), [dict(LOAD, peer_id=peer_id, model=MODEL, uids=[uid])])
    replica = dict(LOAD, version=10**6, trainable=True, state="forged")
    as_itself, as_leader = forge(dht_peer, expert_key(swarm, uid), [dict(replica, peer_id=peer_id), dict(replica, peer_id="!")])
    wait_for(lambda: len(get_records(client_dht, [nodes_key(swarm)])[nodes_key(swarm)] or {}) == 2, what="both node records")
    view = status_json(dht_peer, swarm)
    assert {peer: record["endpoint"] for peer, record in view["nodes"].items()} == {
        peer_id: node.ready["endpoint"], signer_peer_id(spoof): LOAD["endpoint"]
    }
    found = wait_for(lambda: (found := find_experts(client_dht, swarm, [uid])[uid]) and len(found) == 3 and found, what="three replicas")
    assert {record.peer_id: record.endpoint for record in found} == {
        peer_id: node.ready["endpoint"], signer_peer_id(as_itself): LOAD["endpoint"], signer_peer_id(as_leader): LOAD["endpoint"]
    }


def test_a_record_no_node_confirms_cannot_keep_a_node_out(node_factory, client_dht, dht_peer):
    swarm, uid = "gate", "itest.L0.E0"
    real = node_factory("real", experts=[uid], swarm=swarm)
    other_shapes = dict(MODEL, d_ff=128)
    # the same model name with other shapes: at an endpoint where no node answers, and at the real
    # node's endpoint, which answers Info as itself and with the shapes it really serves
    forged = [dict(LOAD, peer_id="x", model=other_shapes, uids=[uid]), dict(LOAD, peer_id="x", endpoint=real.ready["endpoint"], model=other_shapes, uids=[uid])]
    forge(dht_peer, nodes_key(swarm), forged)
    wait_for(lambda: len(get_records(client_dht, [nodes_key(swarm)])[nodes_key(swarm)] or {}) == 3, what="every node record")
    joining = node_factory("joining", experts=[uid], swarm=swarm)  # before: it exited with code 2
    assert joining.log.count("ignoring the node record of") == 2, joining.log[-3000:]
    assert "its endpoint did not answer Info" in joining.log and f"its endpoint answers as peer '{real.ready['peer_id']}'" in joining.log


def test_a_node_serving_other_shapes_still_keeps_a_misconfigured_node_out(node_factory):
    node_factory("real", experts=["itest.L0.E0"], swarm="mistake")
    with pytest.raises(RuntimeError, match=r"exited with 2 before ready(.|\n)*already serves model 'itest' as .*d_ff=64.*confirmed over Info"):
        node_factory("misconfigured", experts=["itest.L0.E0"], swarm="mistake", model=dict(MODEL, d_ff=128))


def test_an_unsigned_value_cannot_hide_a_nodes_experts(node_factory, client_dht, dht_peer):
    # A plain value (no subkey, so no signature) with a later expiration replaces a key's whole
    # dictionary in hivemind's storage, and every signed entry stored there afterwards is refused:
    # one store of a peer with an expiration years away took an expert, or the node list, out of
    # the swarm for good. Every moeswarm DHT peer now refuses records that no owner signs.
    swarm, uid = "unsigned-forgery", "itest.L0.E0"
    node_factory("victim", experts=[uid], swarm=swarm, announce_ttl_s=3)
    wait_for(lambda: find_experts(client_dht, swarm, [uid])[uid], what="the node's record")
    keys = [expert_key(swarm, uid), nodes_key(swarm)]
    result = _forger(dict(maddrs=dht_peer.ready["maddrs"], keys=keys, unsigned={"endpoint": "127.0.0.1:1"}, ttl_s=3600))
    assert result["accepted"] == [False, False]
    time.sleep(4.0)  # past the node's TTL: what the client reads now comes from its later announcements
    (replica,) = find_experts(client_dht, swarm, [uid])[uid]
    assert replica.endpoint != "127.0.0.1:1"
    assert status_json(dht_peer, swarm)["nodes"]
