"""When the client's DHT fails: lookups name the cause, and ExpertDirectory keeps its last view and
logs the failure once a minute, not every refresh (no processes: stand-in DHTs)."""

from __future__ import annotations

import logging
import time
import types

import pytest
from hivemind.utils.crypto import RSAPrivateKey

from moeswarm.model import directory as directory_module
from moeswarm.model.directory import ExpertDirectory
from moeswarm.protocol.client_dht import IsolatedDHT
from moeswarm.protocol.dht import EXIT_P2PD_LOST, get_records
from moeswarm.protocol.errors import NodeUnavailable
from moeswarm.protocol.records import ExpertRecord, dht_subkey, expert_key


class StandInDHT(IsolatedDHT):
    """Answers lookups from a dict, or fails while `failing` is set (no child process)."""

    def __init__(self, records: dict):
        self.records, self.failing, self.lookups = records, False, 0

    def get_records(self, keys, timeout_s=0.0):
        self.lookups += 1
        if self.failing:
            raise NodeUnavailable("the client DHT peer (pid 1) was killed by signal 9; restart this process")
        return {key: self.records.get(key) for key in keys}

    def close(self):
        pass


def wait_for_lookups(dht: StandInDHT, n: int) -> None:
    deadline = time.monotonic() + 10
    start = dht.lookups
    while dht.lookups < start + n and time.monotonic() < deadline:
        time.sleep(0.005)
    assert dht.lookups >= start + n


def test_a_failing_refresh_keeps_the_view_and_is_logged_once_a_minute(caplog):
    uid = "m.L0.E0"
    record = ExpertRecord(peer_id="p", endpoint="127.0.0.1:1", queue_depth=0, rows_per_s=0.0, version=0, wire_dtypes=("float32",))
    subkey = dht_subkey(RSAPrivateKey())  # readers take only signed entries
    dht = StandInDHT({expert_key("default", uid): {subkey: types.SimpleNamespace(value=record.model_dump())}})  # as hivemind returns it
    directory = ExpertDirectory(dht, "default", refresh_s=0.002)
    try:
        directory.track([uid])
        assert [r.endpoint for r in directory.replicas(uid)] == ["127.0.0.1:1"]
        caplog.set_level(logging.WARNING, logger=directory_module.__name__)
        dht.failing = True
        wait_for_lookups(dht, 50)
        failed = [r for r in caplog.records if "refresh failed" in r.getMessage()]
        assert len(failed) == 1 and "killed by signal 9" in failed[0].getMessage() and not failed[0].exc_info
        assert [r.endpoint for r in directory.replicas(uid)] == ["127.0.0.1:1"]  # routing goes on
        dht.failing = False
        wait_for_lookups(dht, 2)
        assert any("works again after" in r.getMessage() for r in caplog.records)
    finally:
        directory.close()


def test_a_lookup_on_a_dead_dht_process_names_the_cause_instead_of_timing_out():
    class DeadDHT:  # what a hivemind.DHT handle reports once its process exited
        exitcode = EXIT_P2PD_LOST

        def is_alive(self):
            return False

        def run_coroutine(self, *args, **kwargs):
            raise AssertionError("a dead DHT process must not be asked (it would only time out)")

    with pytest.raises(NodeUnavailable, match="the DHT process exited with code 3: its p2pd daemon died; restart"):
        get_records(DeadDHT(), ["k"], timeout_s=30)
