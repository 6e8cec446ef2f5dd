"""Announcer logging: a DHT that keeps refusing records (seen after a node restarts under its old
identity) gets one short warning, not a line per refresh carrying a whole RSA key."""

from __future__ import annotations

import asyncio
import logging

from moeswarm.node.announcer import Announcer

SUBKEY = b"[owner:ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC" + b"x" * 300 + b"]"


class RefusingDHT:
    """Answers store_many as hivemind does, {(key, subkey): stored?}, refusing while `refuse` is set."""

    def __init__(self):
        self.refuse = True

    def run_coroutine(self, call, return_future: bool = False):
        async def answer():
            keys = call.keywords["keys"]
            return {(key, call.keywords["subkey"]): not self.refuse for key in keys}

        return answer()


class Record:
    def model_dump(self) -> dict:
        return {}


def records():
    return Record(), {"m.L0.E0": Record()}


def test_refusals_are_warned_once_without_the_key_and_the_recovery_is_said(caplog):
    dht = RefusingDHT()
    announcer = Announcer(dht, swarm="s", subkey=SUBKEY, ttl_s=30, records=records)
    with caplog.at_level(logging.DEBUG, logger="moeswarm.node.announcer"):
        for _ in range(5):
            asyncio.run(announcer.announce_once())
        dht.refuse = False
        asyncio.run(announcer.announce_once())
        asyncio.run(announcer.announce_once())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "DHT refused 2 of 2 records" in warnings[0].getMessage(), caplog.text
    assert "ssh-rsa" not in caplog.text and "moeswarm:s:nodes" in warnings[0].getMessage()
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == ["the DHT stores this node's records again"]
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 4
