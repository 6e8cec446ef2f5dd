"""The client's DHT peer: a hivemind DHT in a child interpreter (never a fork of the user's process),
answering lookups over a local socket. `python -m moeswarm.protocol.client_dht` is that child."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import multiprocessing.connection
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from moeswarm.protocol.dht import (
    DHT_START_TIMEOUT_S, DHT_STOP_TIMEOUT_S, DHT_TIMEOUT_S, describe_dht_exit, get_records, import_dht_only, lookup_batches,
    start_dht, stop_dht,
)
from moeswarm.protocol.errors import NodeUnavailable
from moeswarm.protocol.quick_import import import_with_gc_paused


class IsolatedDHT:
    """A client-mode DHT peer in a child interpreter (not a fork), answering lookups over a local socket.

    hivemind.DHT forks its worker from the calling process. Forking a process that already runs
    threads (gRPC pollers, torch, user code) can leave the child deadlocked: we saw a client's DHT
    child spin and never answer after the test process had used gRPC and autograd. Clients live
    inside users' processes, so they never fork: a fresh `python -m moeswarm.protocol.client_dht` does,
    from a clean state. (multiprocessing's spawn would re-run the user's __main__; this does not.)
    """

    def __init__(self, initial_peers: list[str], *, start_timeout_s: float = DHT_START_TIMEOUT_S, wait: bool = True):
        """wait=False returns at once: the child starts (imports, joins the swarm) while the caller goes
        on, e.g. importing torch; the first lookup (or wait_ready) waits for it."""
        self._authkey = secrets.token_bytes(32)
        # Its own session: a Ctrl-C in the owner's terminal, sent to the whole foreground group, could
        # otherwise reach it before it ignores SIGINT (its first ~50 ms) and print a traceback there.
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moeswarm.protocol.client_dht"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            start_new_session=True,
        )
        config = {"authkey": self._authkey.hex(), "initial_peers": list(initial_peers)}
        self._proc.stdin.write(json.dumps(config).encode() + b"\n")
        self._proc.stdin.flush()  # kept open: the child stops when it reads EOF, i.e. when this process dies
        self._lock, self._ids = threading.Lock(), itertools.count()
        self._deadline = time.monotonic() + start_timeout_s
        self._conn = None
        self._address: str | None = None  # its socket, in a temporary directory the child owns
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until the child DHT peer has joined and accepts lookups (NodeUnavailable on timeout)."""
        with self._lock:
            if self._conn is None:
                self._address = self._read_address(max(0.0, self._deadline - time.monotonic()))
                self._conn = multiprocessing.connection.Client(self._address, family="AF_UNIX", authkey=self._authkey)

    def _read_address(self, timeout_s: float) -> str:
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout_s)
        line = self._proc.stdout.readline().decode().strip() if ready else ""
        if not line.startswith("ready "):
            # A child that reported its failure is on its way out, removing its temporary directory:
            # let it. One that said nothing in time may be stuck: kill it.
            failed = line.startswith("failed ")
            try:
                self._proc.wait(DHT_STOP_TIMEOUT_S + 3 if failed else 0)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc.stdin.close()
            if failed:
                raise NodeUnavailable(line[len("failed "):])
            raise NodeUnavailable(f"the client DHT peer did not start in time ({line or 'no answer'}); check --initial-peers")
        return line.split(" ", 1)[1]

    def get_records(self, keys: list[str], timeout_s: float = DHT_TIMEOUT_S) -> dict:
        self.wait_ready()
        with self._lock:  # one request at a time; replies carry the request id, stale ones are skipped
            request_id = next(self._ids)
            try:
                self._conn.send((request_id, keys, timeout_s))
                deadline = time.monotonic() + timeout_s * len(lookup_batches(keys)) + 1.0  # the child's bound
                while self._conn.poll(max(0.0, deadline - time.monotonic())):
                    reply_id, ok, value = self._conn.recv()
                    if reply_id == request_id:
                        if ok:
                            return value
                        raise NodeUnavailable(value)
            except (OSError, EOFError) as e:  # the child is gone (killed, crashed)
                raise NodeUnavailable(
                    f"the client DHT peer (pid {self._proc.pid}) {describe_dht_exit(self._proc.poll())}; restart this process to reach the swarm again"
                ) from e
        raise NodeUnavailable(f"the DHT did not answer within {timeout_s:.0f} s; check --initial-peers")

    def close(self) -> None:
        try:
            self.wait_ready()  # a child still starting is stopped through its socket too: it cleans up p2pd
            self._conn.send(None)
            self._conn.close()
        except (OSError, ValueError, NodeUnavailable):
            pass
        try:
            self._proc.wait(DHT_STOP_TIMEOUT_S + 3)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        if self._address is not None:  # the child removes it on the way out, unless it was killed
            shutil.rmtree(os.path.dirname(self._address), ignore_errors=True)


def _serve_lookups() -> None:
    """Body of `python -m moeswarm.protocol.client_dht`: one client DHT peer serving one owner."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the owner process decides when we stop
    import_dht_only()
    import_with_gc_paused("hivemind.dht")  # and torch with it: this process is ready ~0.15 s sooner
    line = sys.stdin.readline()
    if not line:  # the owner died before it sent what to join
        return
    request = json.loads(line)
    authkey = bytes.fromhex(request["authkey"])
    listening = threading.Event()
    with tempfile.TemporaryDirectory(prefix="moeswarm-dht-") as tmp:
        address = os.path.join(tmp, "socket")
        try:
            dht = start_dht(initial_peers=request["initial_peers"], client_mode=True)
        except NodeUnavailable as e:  # the owner raises it (bad or unreachable peers): no traceback here
            _tell_owner(f"failed {e}")
            sys.exit(1)
        # After start_dht: it forks, and a fork taken while a thread blocks in a read of stdin could
        # not close the inherited stdin (multiprocessing's bootstrap does) and would hang.
        threading.Thread(target=_stop_when_owner_dies, args=(address, authkey, listening), daemon=True).start()
        try:
            with multiprocessing.connection.Listener(address, family="AF_UNIX", authkey=authkey) as listener:
                listening.set()
                if not _tell_owner(f"ready {address}"):
                    return  # no one will connect
                with listener.accept() as conn:
                    _answer(conn, dht)
        finally:
            stop_dht(dht)


def _tell_owner(line: str) -> bool:
    """Write a line to the owner's pipe; False where the owner is gone (the pipe broke), with our
    stdout silenced: the owner's terminal (our stderr) gets no traceback, now or when Python flushes
    stdout at exit. `moeswarm generate` starts us before it imports torch: a Ctrl-C during that import
    ends it while we start."""
    try:
        print(line, flush=True)
        return True
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return False


def _stop_when_owner_dies(address: str, authkey: bytes, listening: threading.Event) -> None:
    """The owner keeps our stdin open; EOF means it closed us or died, possibly (kill -9) before it
    ever connected, which would leave us and p2pd waiting in accept() forever. Connect as it would
    and ask for the stop."""
    while os.read(sys.stdin.fileno(), 1 << 16):  # the raw fd: no Python-level lock is held while waiting
        pass
    if not listening.wait(DHT_START_TIMEOUT_S + 5):
        return  # never came up: start_dht raised, and the main thread is on its way out
    try:
        with multiprocessing.connection.Client(address, family="AF_UNIX", authkey=authkey) as conn:
            conn.send(None)
    except (OSError, EOFError, multiprocessing.AuthenticationError):
        pass  # the owner's own connection came first: its EOF stops the main thread


def _answer(conn, dht) -> None:
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the owner died
            return
        if request is None:
            return
        request_id, keys, timeout_s = request
        try:
            answer = (request_id, True, get_records(dht, keys, timeout_s))
        except NodeUnavailable as e:
            answer = (request_id, False, str(e))
        try:
            conn.send(answer)
        except (BrokenPipeError, ConnectionResetError):  # the owner died mid-lookup (a Ctrl-C in `generate`):
            return  # no traceback on its terminal, which is our stderr too


if __name__ == "__main__":
    _serve_lookups()
