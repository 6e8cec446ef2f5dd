"""Starting and stopping our hivemind DHT peers the same way everywhere.

A DHT peer is a forked child plus a p2pd daemon. A terminal's Ctrl-C reaches p2pd too (uvloop resets
its SIGINT disposition), after which a graceful DHT shutdown can only time out: keep that timeout
short and kill the child after it. `moeswarm swarm up` avoids it by giving each peer its own session.
"""

from __future__ import annotations

import logging

from moeswarm.protocol.records import dht_validators

logger = logging.getLogger(__name__)
DHT_STOP_TIMEOUT_S = 1.0  # keeps a node's whole shutdown under 5 s even when p2pd died first


def start_dht(
    *, initial_peers: list[str] = (), host: str = "127.0.0.1", port: int = 0, private_key=None, client_mode: bool = False
):
    """A started hivemind.DHT with moeswarm's record validators. Create it before any gRPC object."""
    import hivemind

    kwargs = dict(
        initial_peers=list(initial_peers),
        record_validators=dht_validators(private_key),
        shutdown_timeout=DHT_STOP_TIMEOUT_S,
        start=True,
    )
    if client_mode:
        kwargs["client_mode"] = True
    else:
        kwargs["host_maddrs"] = [f"/ip4/{host}/tcp/{port}"]
    return hivemind.DHT(**kwargs)


def stop_dht(dht) -> None:
    """Shut the DHT down; kill its process if it does not stop in time."""
    dht.shutdown()
    dht.join(DHT_STOP_TIMEOUT_S)
    if dht.is_alive():
        logger.warning("DHT process %s did not stop in %.0f s; killing it", dht.pid, DHT_STOP_TIMEOUT_S)
        dht.kill()
        dht.join(DHT_STOP_TIMEOUT_S)
