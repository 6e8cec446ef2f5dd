"""Fixtures: a real DHT bootstrap peer and real node processes on 127.0.0.1, reaped after use."""

from __future__ import annotations

import logging
import pathlib
import signal
import subprocess
import sys
import warnings

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from procs import Proc, ProcGroup, node_args, start_dht_peer, start_node  # noqa: E402

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
    """start(name, **config_overrides) -> Proc; start.all(name=config_overrides, ...) -> [Proc], the
    nodes started in parallel (about 1 s less a node on 2 cores). Every node started is killed at the
    end of the test."""
    started: list[Proc] = []

    def start(name: str = "node", **overrides) -> Proc:
        proc = start_node(tmp_path / name, node_config(dht_peer.ready["maddrs"], **overrides))
        started.append(proc)
        return proc

    def start_all(**configs: dict) -> list[Proc]:
        group = ProcGroup()
        for name, overrides in configs.items():
            group.spawn(tmp_path / name, *node_args(tmp_path / name, node_config(dht_peer.ready["maddrs"], **overrides)))
        started.extend(group.procs)
        group.wait_ready()
        return group.procs

    start.all = start_all
    yield start
    for proc in started:
        proc.kill()


@pytest.fixture(scope="module")
def plain_node(dht_peer, tmp_path_factory) -> Proc:
    """One default node shared by a module's tests that only run forwards on it (which change nothing):
    a node start costs about 2 s."""
    node = start_node(tmp_path_factory.mktemp("plain"), node_config(dht_peer.ready["maddrs"]))
    yield node
    node.kill()


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


@pytest.fixture
def cli_here(capfd):
    """run(*args) -> subprocess.CompletedProcess of `moeswarm ARGS` in this process (`cli.main(args)`), for
    commands that never fork (a client's DHT peer is a child interpreter: IsolatedDHT): no ~1.5 s of
    imports per call. Its stdout and stderr are what a process of its own would print: file descriptors
    1 and 2 captured, logging set up by main itself, warnings under Python's default filters. Afterwards
    this process's signal handlers, log levels, torch thread count and transformers' verbosity are as
    they were. Keep a subprocess where the console entry point itself is what a test is about."""
    from moeswarm.deploy import cli as cli_module

    def run(*args: str) -> subprocess.CompletedProcess:
        root, ours = logging.getLogger(), logging.getLogger("moeswarm")
        handlers, levels = root.handlers[:], (root.level, ours.level)
        signals = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        verbosity, threads = _transformers_verbosity(), torch.get_num_threads()
        capfd.readouterr()
        root.handlers = []  # so main's logging.basicConfig writes to stderr, as in a process of its own
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.resetwarnings()  # Python's default filters, not pytest's
                for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                    warnings.simplefilter("ignore", category)
                warnings.simplefilter("default", append=True)
                try:
                    code = cli_module.main(list(args))
                except SystemExit as e:
                    code = e.code
        finally:
            for handler in root.handlers:
                handler.close()
            root.handlers = handlers
            root.setLevel(levels[0])
            ours.setLevel(levels[1])
            for sig, handler in signals.items():
                signal.signal(sig, handler)
            torch.set_num_threads(threads)
            if verbosity is not None:
                import transformers

                transformers.logging.set_verbosity(verbosity)
        out, err = capfd.readouterr()
        err += "".join(f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}\n" for w in caught)
        return subprocess.CompletedProcess(["moeswarm", *args], code, out, err)

    return run


def _transformers_verbosity() -> int | None:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.logging.get_verbosity()
