"""An attacker DHT peer for test_node_lifecycle, run as its own interpreter (never forked from the
test process, which holds gRPC threads by then: see IsolatedDHT).

    python forge_records.py '{"maddrs": [...], "key": K, "victim_subkey": HEX, "forged": {...}, "garbage": {...}}'

Joins the swarm with a fresh RSA key, tries to overwrite the victim's subkey with `forged`, stores
`garbage` under its own subkey, and prints {"overwrite_accepted": bool, "own_accepted": bool, "own_subkey": HEX}.
"""

from __future__ import annotations

import functools
import json
import sys

from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from moeswarm.protocol.dht import start_dht, stop_dht
from moeswarm.protocol.records import dht_subkey


async def _store(dht, node, key, value, subkey):
    return await node.store(key, value, get_dht_time() + 30, subkey=subkey)


def main(args: dict) -> dict:
    private_key = RSAPrivateKey()
    dht = start_dht(initial_peers=args["maddrs"], private_key=private_key)
    try:
        store = functools.partial(_store, key=args["key"])
        overwrite = dht.run_coroutine(functools.partial(store, value=args["forged"], subkey=bytes.fromhex(args["victim_subkey"])))
        own_subkey = dht_subkey(private_key)
        own = dht.run_coroutine(functools.partial(store, value=args["garbage"], subkey=own_subkey))
        return {"overwrite_accepted": bool(overwrite), "own_accepted": bool(own), "own_subkey": own_subkey.hex()}
    finally:
        stop_dht(dht)


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
