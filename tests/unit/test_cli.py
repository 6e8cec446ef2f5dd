"""deploy/cli.py: logging set-up and --help texts (the CLI in a subprocess where its output is the point)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from moeswarm.deploy.cli import configure_logging


def test_our_loggers_log_at_the_chosen_level_and_other_libraries_only_warnings():
    root, ours = logging.getLogger(), logging.getLogger("moeswarm")
    saved = root.level, ours.level
    try:
        configure_logging("info")
        assert logging.getLogger("moeswarm.node.server").isEnabledFor(logging.INFO)
        # torch logs FakeTensor cache stats at INFO when the process exits (after a Ctrl-C, say)
        assert not logging.getLogger("torch._subclasses.fake_tensor").isEnabledFor(logging.INFO)
        assert logging.getLogger("torch._subclasses.fake_tensor").isEnabledFor(logging.WARNING)
        configure_logging("debug")
        assert logging.getLogger("moeswarm.model.dispatcher").isEnabledFor(logging.DEBUG)
        assert not logging.getLogger("grpc").isEnabledFor(logging.INFO)
        configure_logging("error")
        assert not logging.getLogger("moeswarm.node.server").isEnabledFor(logging.WARNING)
        assert not logging.getLogger("some_library").isEnabledFor(logging.WARNING)
    finally:
        root.setLevel(saved[0])
        ours.setLevel(saved[1])


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("swarm up", ["--nodes NODES         node processes to start (default: 4)", "--swarm SWARM", "(default: default)"]),
        ("generate", ["--initial-peers MADDR", "required unless --local", "--prompt PROMPT", "(default: 64)",
                      "--top-p TOP_P", "(default: 1.0)", "--seed SEED", "--swarm SWARM"]),
        ("status", ["--initial-peers MADDR", "--swarm SWARM"]),
        ("dht", ["--port PORT", "0: any free port (default: 0)", "--initial-peers MADDR", "start a new swarm"]),
        ("model init", ["folder to write", "tiny: 4 layers, d_model 128", "small: 4 layers, d_model 256"]),
    ],
)
def test_help_explains_every_option_with_its_default(command, expected):
    done = subprocess.run(
        [sys.executable, "-m", "moeswarm.deploy.cli", *command.split(), "--help"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # argparse wraps lines: compare with single spaces
    for fragment in expected:
        assert " ".join(fragment.split()) in text, (fragment, done.stdout)

