"""An attacker DHT peer for the integration tests, run as its own interpreter (never forked from the
test process, which holds gRPC threads by then: see IsolatedDHT).

    python forge_records.py '{"maddrs": [...], "key": K, "victim_subkey": HEX, "forged": {...}, "garbage": {...}}'

Joins the swarm with a fresh RSA key, tries to overwrite the victim's subkey with `forged`, stores
`garbage` under its own subkey, and prints {"overwrite_accepted": bool, "own_accepted": bool, "own_subkey": HEX}.

    python forge_records.py '{"maddrs": [...], "keys": [K, ...], "unsigned": V, "ttl_s": 3600}'

Stores V under each key as a plain value (no subkey, so no signature), and prints {"accepted": [bool, ...]}.

    python forge_records.py '{"maddrs": [...], "key": K, "signed": [{...}, ...], "ttl_s": 60}'

Stores each value of `signed` under its own subkey, each with a fresh RSA key (so as many signers as
values), and prints {"accepted": [bool, ...], "subkeys": [HEX, ...]}. A value's "uids" may be
{"model": M, "count": N}: the UIDs M.L0.E0 ... are made inside the DHT process, since a large
request to it can break hivemind's pipe (see protocol/dht.py MAX_LOOKUP_KEY_BYTES).
"""

from __future__ import annotations

import functools
import json
import sys

from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import get_dht_time

from moeswarm.protocol.dht import start_dht, stop_dht
from moeswarm.protocol.records import dht_subkey


async def _store(dht, node, key, value, subkey, ttl_s=30.0):
    uids = value.get("uids") if isinstance(value, dict) else None
    if isinstance(uids, dict):
        value = dict(value, uids=[f"{uids['model']}.L0.E{i}" for i in range(uids["count"])])
    return await node.store(key, value, get_dht_time() + ttl_s, subkey=subkey)


def overwrite(args: dict) -> dict:
    private_key = RSAPrivateKey()
    dht = start_dht(initial_peers=args["maddrs"], private_key=private_key)
    try:
        store = functools.partial(_store, key=args["key"])
        taken = dht.run_coroutine(functools.partial(store, value=args["forged"], subkey=bytes.fromhex(args["victim_subkey"])))
        own_subkey = dht_subkey(private_key)
        own = dht.run_coroutine(functools.partial(store, value=args["garbage"], subkey=own_subkey))
        return {"overwrite_accepted": bool(taken), "own_accepted": bool(own), "own_subkey": own_subkey.hex()}
    finally:
        stop_dht(dht)


def sign_each(args: dict) -> dict:
    accepted, subkeys = [], []
    for value in args["signed"]:
        private_key = RSAPrivateKey()
        dht = start_dht(initial_peers=args["maddrs"], private_key=private_key)
        try:
            store = functools.partial(_store, key=args["key"], value=value, subkey=dht_subkey(private_key), ttl_s=args.get("ttl_s", 30.0))
            accepted.append(bool(dht.run_coroutine(store)))
            subkeys.append(dht_subkey(private_key).hex())
        finally:
            stop_dht(dht)
    return {"accepted": accepted, "subkeys": subkeys}


def store_unsigned(args: dict) -> dict:
    dht = start_dht(initial_peers=args["maddrs"], private_key=RSAPrivateKey())
    try:
        store = functools.partial(_store, value=args["unsigned"], subkey=None, ttl_s=args["ttl_s"])
        return {"accepted": [bool(dht.run_coroutine(functools.partial(store, key=key))) for key in args["keys"]]}
    finally:
        stop_dht(dht)


if __name__ == "__main__":
    request = json.loads(sys.argv[1])
    mode = sign_each if "signed" in request else store_unsigned if "unsigned" in request else overwrite
    print(json.dumps(mode(request)), flush=True)
