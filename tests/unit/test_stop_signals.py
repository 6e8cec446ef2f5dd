"""SIGINT/SIGTERM in the commands that serve (deploy/stop_signals.py): a Ctrl-C while the command line
is parsed ends the process at once with 130; StopFlag records signals without taking a lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

from moeswarm.deploy.stop_signals import StopFlag, exit_code_when_stopped

# A Ctrl-C that lands while `moeswarm` parses its command line (its first ~0.1 s), made exact by sending
# it from inside the parser: before, Python's KeyboardInterrupt escaped main() with a traceback.
CTRL_C_WHILE_PARSING = """
import os, signal, sys
import moeswarm.deploy.cli as cli
parser = cli._parser
def parser_after_a_ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)
    return parser()
cli._parser = parser_after_a_ctrl_c
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", [["dht"], ["swarm", "up"]])
def test_ctrl_c_while_parsing_exits_130_without_a_traceback(command):
    result = subprocess.run([sys.executable, "-c", CTRL_C_WHILE_PARSING, *command], capture_output=True, text=True, timeout=60)
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr, result.stderr


def test_commands_that_do_not_serve_keep_their_keyboard_interrupt():
    """`status`, `generate`, `model init` stop on KeyboardInterrupt: main() gives the handlers back."""
    script = (
        "import signal\n"
        "import moeswarm.deploy.cli as cli\n"
        "assert cli.main(['generate', '--model', 'm', '--prompt', 'p']) == 2\n"  # a config error, at once
        "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip().endswith("True"), result.stdout + result.stderr


@pytest.fixture
def restore_handlers():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_stop_flag_records_signals_and_wakes_its_waiter(restore_handlers):
    flag = StopFlag().install()
    assert not flag.is_set() and flag.wait(0.01) is False
    threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()  # from another thread, as a supervisor's
    assert flag.wait(30) is True
    signal.raise_signal(signal.SIGINT)
    assert flag.signals == [signal.SIGTERM, signal.SIGINT]
    assert exit_code_when_stopped(flag.signals) == 130 and exit_code_when_stopped([signal.SIGTERM]) == 0
