"""The client DHT child's answer loop (protocol/client_dht.py), over a real pipe."""

from __future__ import annotations

import multiprocessing

from moeswarm.protocol import client_dht


def test_an_owner_gone_mid_lookup_ends_the_answer_loop_without_an_error(monkeypatch):
    # A Ctrl-C in `moeswarm generate` while its DHT child looked experts up: the answer met a closed
    # pipe, and the child printed a BrokenPipeError traceback on the user's terminal.
    monkeypatch.setattr(client_dht, "get_records", lambda dht, keys, timeout_s: {key: [] for key in keys})
    owner, child = multiprocessing.Pipe()
    owner.send((7, ["moeswarm:default:expert:m.L0.E0"], 1.0))
    owner.close()
    client_dht._answer(child, dht=None)  # returns: nothing raised
    child.close()


def test_answers_and_lookup_failures_reach_the_owner(monkeypatch):
    def lookup(dht, keys, timeout_s):
        if keys == ["bad"]:
            raise client_dht.NodeUnavailable("no peers")
        return {key: [] for key in keys}

    monkeypatch.setattr(client_dht, "get_records", lookup)
    owner, child = multiprocessing.Pipe()
    owner.send((1, ["k"], 1.0))
    owner.send((2, ["bad"], 1.0))
    owner.send(None)
    client_dht._answer(child, dht=None)
    assert owner.recv() == (1, True, {"k": []})
    assert owner.recv() == (2, False, "no peers")
