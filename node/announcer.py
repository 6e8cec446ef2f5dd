"""Keeps this node's DHT records alive: one signed entry per hosted expert plus the node list entry."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Callable

import hivemind
from hivemind.utils.timed_storage import get_dht_time

from moeswarm.protocol.dht import rejoin_initial_peers
from moeswarm.protocol.records import DEPARTED, ExpertRecord, NodeRecord, expert_key, nodes_key

logger = logging.getLogger(__name__)


async def _store_many(dht: hivemind.DHT, node, keys, values, expiration_time: float, subkey: bytes) -> dict:
    # Runs inside the DHT process (see hivemind.DHT.run_coroutine).
    rejoin_initial_peers(dht, node)  # a bootstrap that was down during a refresh gets this node's records again
    return await node.store_many(keys, values, expiration_time, subkeys=[subkey] * len(keys))


class Announcer:
    def __init__(
        self,
        dht: hivemind.DHT,
        *,
        swarm: str,
        subkey: bytes,
        ttl_s: float,
        records: Callable[[], tuple[NodeRecord, dict[str, ExpertRecord]]],
    ):
        self._dht, self._swarm, self._subkey, self._ttl_s, self._records = dht, swarm, subkey, ttl_s, records
        self._refusing = False  # the last announce had refused records
        self._stored_keys: set[str] = set()  # every key this node has stored an entry under

    async def announce_once(self) -> None:
        node_record, expert_records = self._records()
        keys = [nodes_key(self._swarm)] + [expert_key(self._swarm, uid) for uid in expert_records]
        values = [node_record.model_dump()] + [record.model_dump() for record in expert_records.values()]
        expiration = get_dht_time() + self._ttl_s
        self._stored_keys.update(keys)
        call = functools.partial(_store_many, keys=keys, values=values, expiration_time=expiration, subkey=self._subkey)
        results = await asyncio.wait_for(self._dht.run_coroutine(call, return_future=True), self._ttl_s / 3)
        failed = [key for key, ok in results.items() if not ok]
        if failed:
            first = failed[0][0] if isinstance(failed[0], tuple) else failed[0]  # (key, subkey): the subkey is a whole RSA key
            log = logger.debug if self._refusing else logger.warning  # a volunteer's log must not grow by a line every refresh
            log("DHT refused %d of %d records (first: %s)%s", len(failed), len(keys), first,
                "" if self._refusing else "; refusals are logged at debug level until the records are stored again")
        elif self._refusing:
            logger.info("the DHT stores this node's records again")
        self._refusing = bool(failed)

    async def announce(self) -> bool:
        """announce_once, except that a timeout is logged, not raised (the next refresh tries again):
        the DHT is slow or unreachable, or a peer it stores to is gone off the network, which hivemind
        waits for before it drops it. Returns whether the records were stored in time."""
        try:
            await self.announce_once()
        except asyncio.TimeoutError:  # no traceback: it says nothing more
            logger.warning("DHT announce timed out after %.1f s; retrying in %.1f s", self._ttl_s / 3, self._ttl_s / 3)
            return False
        return True

    async def withdraw(self, timeout_s: float) -> bool:
        """Replace every entry this node stored with DEPARTED, so readers stop listing it now rather
        than when its records expire. The DHT keeps the entry that expires last for each (key, signer),
        so DEPARTED expires a TTL from now: after any record already stored or still on its way, and
        before the records of this node's next start (same identity) could need to replace it.
        Returns whether it was stored in time; a failure is logged (the records then just expire)."""
        keys = sorted(self._stored_keys)
        if not keys:
            return True
        call = functools.partial(
            _store_many, keys=keys, values=[DEPARTED] * len(keys), expiration_time=get_dht_time() + self._ttl_s, subkey=self._subkey
        )
        try:
            results = await asyncio.wait_for(self._dht.run_coroutine(call, return_future=True), timeout_s)
        except asyncio.TimeoutError:
            logger.warning("could not withdraw this node's DHT records in %.1f s; they expire within %.0f s", timeout_s, self._ttl_s)
            return False
        except Exception as e:  # the DHT process is gone or broken: the records expire by themselves
            logger.warning("could not withdraw this node's DHT records (%s); they expire within %.0f s", e, self._ttl_s)
            return False
        stored = sum(bool(ok) for ok in results.values())
        if stored < len(keys):
            logger.warning("withdrew %d of %d DHT records; the others expire within %.0f s", stored, len(keys), self._ttl_s)
            return False
        logger.info("withdrew this node's %d DHT records", len(keys))
        return True

    async def run(self) -> None:
        """Refresh every third of the TTL, so a record survives two lost refreshes."""
        while True:
            await asyncio.sleep(self._ttl_s / 3)
            try:
                await self.announce()
            except Exception:  # task boundary: a DHT hiccup must not stop future refreshes
                logger.warning("DHT announce failed; retrying in %.1f s", self._ttl_s / 3, exc_info=True)
