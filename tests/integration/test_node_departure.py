"""A node that stops cleanly withdraws its DHT records: `status` and clients stop listing it at their
next read, not when its records expire. A node killed outright is listed until they expire."""

from __future__ import annotations

import os
import signal

from procs import wait_for
from moeswarm.model.directory import find_experts, read_swarm

UIDS = ["itest.L0.E0", "itest.L1.E2"]


def _hosts(client_dht, swarm: str) -> dict[str, set[str]]:
    return {uid: {record.endpoint for record in records} for uid, records in find_experts(client_dht, swarm, UIDS).items()}


def test_a_node_stopped_cleanly_leaves_every_view_at_once_one_killed_stays_until_its_ttl(node_factory, client_dht):
    config = dict(experts=UIDS, swarm="departure", announce_ttl_s=600)  # expiry cannot explain what follows
    stays, leaves, killed = node_factory.all(stays=config, leaves=config, killed=config)
    everyone = {node.ready["endpoint"] for node in (stays, leaves, killed)}
    wait_for(lambda: all(hosts == everyone for hosts in _hosts(client_dht, "departure").values()), what="three replicas")

    os.kill(leaves.popen.pid, signal.SIGTERM)
    assert leaves.popen.wait(10) == 0
    killed.kill()  # kill -9: no chance to withdraw anything
    # read once, right after: the withdrawal was stored before the node exited
    remaining = {stays.ready["endpoint"], killed.ready["endpoint"]}
    assert _hosts(client_dht, "departure") == {uid: remaining for uid in UIDS}
    view = read_swarm(client_dht, "departure")
    assert set(view.nodes) == {stays.ready["peer_id"], killed.ready["peer_id"]}
    assert "withdrew this node's 3 DHT records" in leaves.log
