"""Fixtures: a real DHT bootstrap peer and real node processes on 127.0.0.1, reaped after use."""

from __future__ import annotations

import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from procs import Proc, start_dht_peer, start_node  # noqa: E402

MODEL = dict(name="itest", d_model=32, d_ff=64, n_layers=2, n_experts=4)


def node_config(initial_peers: list[str], **overrides) -> dict:
    config = dict(model=MODEL, experts="all", initial_peers=initial_peers, seed=7, torch_threads=1, state_dir=None)
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def dht_peer(tmp_path_factory) -> Proc:
    proc = start_dht_peer(tmp_path_factory.mktemp("dht"))
    yield proc
    proc.kill()


@pytest.fixture
def node_factory(tmp_path, dht_peer):
    """start(**config_overrides) -> Proc; every node started is killed at the end of the test."""
    started: list[Proc] = []

    def start(name: str = "node", **overrides) -> Proc:
        proc = start_node(tmp_path / name, node_config(dht_peer.ready["maddrs"], **overrides))
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


@pytest.fixture
def client_dht(dht_peer):
    from moeswarm.protocol.client_dht import IsolatedDHT

    dht = IsolatedDHT(dht_peer.ready["maddrs"])  # never fork the test process (see IsolatedDHT)
    yield dht
    dht.close()


@pytest.fixture(autouse=True)
def _single_thread_torch():
    # Same intra-op thread count as the nodes, so local reference matmuls take the same kernels.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

