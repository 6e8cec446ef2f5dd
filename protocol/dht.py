"""Starting, stopping and reading our hivemind DHT peers the same way everywhere.

A DHT peer is a forked child plus a p2pd daemon. A terminal's Ctrl-C reaches p2pd too (uvloop resets
its SIGINT disposition), after which a graceful DHT shutdown can only time out: keep that timeout
short and kill the child after it. `moeswarm swarm up` avoids it by giving each peer its own session.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import importlib.util
import ipaddress
import logging
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import sys
import threading
import time
from typing import Any, Callable, NamedTuple

from moeswarm.protocol.errors import NodeUnavailable

logger = logging.getLogger(__name__)
DHT_TIMEOUT_S = 10.0  # bound on one lookup
DHT_START_TIMEOUT_S = 60.0
DHT_STOP_TIMEOUT_S = 1.0  # keeps a node's whole shutdown under 5 s even when p2pd died first
# Bytes of keys per lookup request: longer key lists are looked up in several requests, each with
# its own timeout. They were first split because a request over 16 KiB killed the DHT process (its
# cause is fixed by _WholeMessagePipe); without the split, one lookup of ~3,000 keys still found no
# answer within 10 s (its reply's path back or the lookup itself: not pinned down), so it stays.
MAX_LOOKUP_KEY_BYTES = 8 << 10
_KEY_OVERHEAD_BYTES = 8  # what pickling adds per key, at most


class DHTEntry(NamedTuple):
    """One subkey's entry of a dictionary value, as get_records returns it (records.parse_entries)."""

    value: Any
    expiration_time: float


def import_dht_only() -> None:
    """Let this process import hivemind's DHT without hivemind's package __init__, which loads its
    averaging, MoE and optimizer stacks (scipy included): 0.3-0.45 s that moeswarm's processes never use.
    Call it first thing in a process of ours (CLI commands, the DHT child), never in a user's process.
    A no-op once hivemind is imported. Any other top-level name (hivemind.DHT, hivemind.Optimizer, ...)
    still works: its first use runs the real __init__ (a PEP 562 module __getattr__)."""
    if "hivemind" in sys.modules:
        return
    spec = importlib.util.find_spec("hivemind")
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return
    package = importlib.util.module_from_spec(spec)

    def __getattr__(name: str):  # noqa: N807  (the module hook's required name)
        submodule = sys.modules.get(f"hivemind.{name}")
        if submodule is not None:  # `import hivemind.x.y as z` reads it as an attribute while x still loads
            return submodule
        del package.__getattr__  # once: the real __init__ now defines the package's names
        spec.loader.exec_module(package)
        return getattr(package, name)

    package.__getattr__ = __getattr__
    sys.modules["hivemind"] = package


class _WholeMessagePipe:
    """The DHT process's end of hivemind's request pipe, read in blocking mode. hivemind watches the
    pipe with uvloop's add_reader, which makes the descriptor non-blocking; a request over 16 KiB
    (multiprocessing sends it in two writes) was then read half-way, and the unpickling error killed
    the DHT process: a node hosting more than ~100 experts lost its DHT at its first announce."""

    def __init__(self, connection):
        self._connection = connection

    def __getattr__(self, name: str):
        return getattr(self._connection, name)

    def recv(self):
        fd = self._connection.fileno()
        os.set_blocking(fd, True)  # the rest of a message arrives at once: its writer is mid-send
        try:
            return self._connection.recv()
        finally:
            os.set_blocking(fd, False)  # as libuv set it


def start_dht(
    *, initial_peers: list[str] = (), host: str = "127.0.0.1", port: int = 0, private_key=None, client_mode: bool = False,
    await_ready: bool = True, announce_host: str | None = None, identity_path: str | None = None,
):
    """A started hivemind.DHT with moeswarm's record validators. Create it before any gRPC object.
    await_ready=False returns once its process is forked; call dht.wait_until_ready() before using it.
    identity_path: the libp2p key file of private_key (p2pd's identity), so that the peer keeps its
    peer id, and its DHT node id (dht_node_id), across restarts."""
    from hivemind.dht import DHT

    from moeswarm.protocol.records import dht_validators  # here: importing this module must stay light

    if identity_path is not None and private_key is None:
        raise ValueError("start_dht: identity_path needs the private_key it holds (the DHT node id derives from it)")

    kwargs = dict(
        initial_peers=list(initial_peers),
        record_validators=dht_validators(private_key),
        shutdown_timeout=DHT_STOP_TIMEOUT_S,
        start=True,
        await_ready=False,  # waited for below, with a clear error instead of hivemind's traceback
    )
    if identity_path is not None:  # the same peer id after a restart
        kwargs["identity_path"] = identity_path
        kwargs["node_id"] = dht_node_id(private_key)
        # hivemind would first start a throwaway p2pd to see whether a live peer uses this key. The
        # node's lock on its state_dir already keeps a second process off the key file, and the
        # throwaway daemon exiting looked like p2pd dying to the DHT process's watcher (below).
        kwargs["check_if_identity_free"] = False
    if client_mode:
        kwargs["client_mode"] = True
    else:
        kwargs["host_maddrs"] = [ip_maddr(host, port)]
        if announce_host is not None:  # peers reach it there (NAT, cloud VM, a wildcard bind): port must be fixed
            kwargs["announce_maddrs"] = [ip_maddr(announce_host, port)]

    class ParentBoundDHT(DHT):  # hivemind's DHT is a ForkProcess: a local class needs no pickling
        def run(self) -> None:  # in the forked DHT process
            _leave_process_group()  # before hivemind starts p2pd: it belongs to the new group too
            # p2pd (go-libp2p) listens with SO_REUSEPORT unless told not to: a second peer given a port
            # in use (a `dht --port P` started twice) started on it too, and the kernel then handed
            # the first one's dialers to the second, whose peer id they refused. Now it fails to start.
            os.environ["LIBP2P_TCP_REUSEPORT"] = "false"  # hivemind gives p2pd this process's environment
            parent = multiprocessing.parent_process()  # the process that forked this one, even if already gone
            parent_pid = parent.pid if parent is not None else os.getppid()
            self._stopping = threading.Event()
            watch = threading.Thread(
                target=_watch_parent_and_p2pd, args=(parent_pid, self._stopping, self._ready.done), name="dht-watch", daemon=True
            )
            watch.start()
            self._inner_pipe = _WholeMessagePipe(self._inner_pipe)
            super().run()

        async def _shutdown(self) -> None:  # in the DHT process, asked to stop: p2pd going away is expected
            self._stopping.set()
            await super()._shutdown()

    dht = ParentBoundDHT(**kwargs)
    if await_ready:
        try:
            wait_dht_ready(dht)
        except Exception as e:
            stop_dht(dht)
            raise NodeUnavailable(dht_start_failure(e, initial_peers)) from e
    return dht


def dht_node_id(private_key):
    """The DHT node id of the peer whose libp2p key is `private_key`: the same at every start.
    hivemind draws a new one at each start, and a peer restarted under its old peer id then lived on
    under its old node id too, in the routing table of every peer that did not see it die (the
    bootstrap's, and from there in others' lookups): a call to that entry reaches the live peer, so
    hivemind never drops it. Other peers' stores then reached it twice, the second copy (the same
    expiration time) was refused, and store_many, which keeps the last answer, reported the record
    refused about every other time, for as long as the peer lived."""
    from hivemind.dht.routing import DHTID

    return DHTID.generate(source=private_key.get_public_key().to_bytes())


def dht_start_failure(error: Exception, initial_peers) -> str:
    """What to tell a user whose DHT peer did not start (hivemind's P2PDaemonError & co: unreachable
    or malformed initial peers, a port in use), without a traceback."""
    reason = re.sub(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d ", "", " ".join(str(error).split()))[:500]  # p2pd's timestamp
    peers = " ".join(initial_peers) or "(none: a new swarm)"
    return f"the DHT peer did not start ({reason or type(error).__name__}); initial peers: {peers}"


def ip_maddr(host: str, port: int) -> str:
    """The TCP multiaddr of an IPv4 or IPv6 address."""
    return f"/ip{ipaddress.ip_address(host).version}/{host}/tcp/{port}"


def grpc_endpoint(host: str, port: int) -> str:
    """host:port as gRPC writes it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ipaddress.ip_address(host).version == 6 else f"{host}:{port}"


ORPHAN_POLL_S = 0.5
P2PD_START_POLL_S = 0.05  # until p2pd is first seen: a p2pd that dies right after starting is noticed too
EXIT_P2PD_LOST = 3  # a DHT process whose p2pd died exits with this code


def describe_dht_exit(exitcode: int | None) -> str:
    """What a DHT process's exit code says, for the node's log."""
    if exitcode is None:
        return "stopped answering"
    if exitcode == EXIT_P2PD_LOST:
        return f"exited with code {exitcode}: its p2pd daemon died"
    if exitcode is not None and exitcode < 0:
        return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def _leave_process_group() -> None:
    """Ctrl-C in a terminal signals the whole foreground process group, and a p2pd that started a
    swarm closes on SIGINT at once, after which hivemind's DHT can no longer shut down (its owner
    waits, then kills it). The DHT process and its p2pd live in a group of their own: the process
    that started them alone decides when they stop, through the DHT's pipe, and if it dies,
    _watch_parent_and_p2pd stops them."""
    try:
        os.setpgid(0, 0)
    except OSError:  # not allowed here (a session leader): stay in the owner's group
        pass


def _watch_parent_and_p2pd(parent_pid: int, stopping: threading.Event, ready: Callable[[], bool]) -> None:
    """In a DHT process. Once the process that started it is gone (even by SIGKILL, which runs no
    cleanup), stop its p2pd and exit, instead of serving a dead node's DHT port forever. Once its
    p2pd is gone (killed, crashed), exit with EXIT_P2PD_LOST: the DHT can do nothing without it,
    and the node watching this process then stops instead of silently dropping out of the swarm.
    `stopping`: set once the DHT was asked to shut down (it stops p2pd itself then). `ready`: whether
    the DHT finished starting; only a p2pd seen alive after that is the DHT's own (one that fails
    before then fails the start, which the node hears from wait_dht_ready)."""
    p2pd_seen = False
    while os.getppid() == parent_pid:
        time.sleep(ORPHAN_POLL_S if p2pd_seen else P2PD_START_POLL_S)
        live = _child_pids(os.getpid(), live_only=True)
        if live and ready():
            p2pd_seen = True
        elif p2pd_seen and not stopping.is_set():
            logger.error("DHT process %d: its p2pd daemon exited; stopping", os.getpid())
            os._exit(EXIT_P2PD_LOST)
    logger.warning("DHT process %d: its parent %d is gone; stopping", os.getpid(), parent_pid)
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for pid in _child_pids(os.getpid()):  # read again each time: a pid freed meanwhile is not ours
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        time.sleep(ORPHAN_POLL_S)
    os._exit(0)


def _child_pids(pid: int, *, live_only: bool = False) -> list[int]:
    """Direct children of `pid` (p2pd), from /proc; none where there is no /proc. live_only: leave
    out zombies (exited, not yet reaped)."""
    children = []
    try:
        entries = [entry for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return children
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except (OSError, IndexError):
            continue  # it exited meanwhile
        if len(fields) > 1 and int(fields[1]) == pid and not (live_only and fields[0] in (b"Z", b"X")):
            children.append(int(entry))
    return children


def wait_dht_ready(dht, poll_s: float = 0.5) -> None:
    """Block until a DHT started with await_ready=False is ready; raise its start error, or
    NodeUnavailable at once if its process died before saying either (hivemind's own wait would
    block forever then)."""
    while True:
        try:
            dht.wait_until_ready(poll_s)
            return
        except concurrent.futures.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            if not dht.is_alive():
                raise NodeUnavailable(f"the DHT process {describe_dht_exit(dht.exitcode)} before it was ready") from None


def stop_dht(dht) -> None:
    """Shut the DHT down; kill its process if it does not stop in time. A peer still starting is
    first let finish (bounded), so that it stops its p2pd itself; one already gone is not waited for
    (its start never finishes: start_dht's failure path would otherwise wait DHT_TIMEOUT_S)."""
    if dht.is_alive():
        try:
            dht.wait_until_ready(DHT_TIMEOUT_S)
        except Exception:  # it failed to start, or is stuck: shut down / kill below either way
            pass
    dht.shutdown()
    dht.join(DHT_STOP_TIMEOUT_S)
    if dht.is_alive():
        logger.warning("DHT process %s did not stop in %.0f s; killing it", dht.pid, DHT_STOP_TIMEOUT_S)
        dht.kill()
        dht.join(DHT_STOP_TIMEOUT_S)


def rejoin_initial_peers(dht, node) -> None:
    """Inside a DHT process, before its lookups and stores: ping, in the background, each initial
    peer missing from the routing table; one that answers is put back (and hivemind's lookup ban on
    it lifted). hivemind drops a peer from the table the first time a call to it goes unanswered and
    never looks for it again, so a bootstrap peer that was down during one of a node's refreshes (a
    restart, a reboot) was forgotten for good: nodes stored only among themselves, and a client or
    a node joining through the restarted bootstrap saw an empty swarm."""
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    pending = node.__dict__.setdefault("_moeswarm_rejoins", {})  # peer id -> its ping task (kept alive here)
    for maddr in dht.initial_peers or ():
        maddr = Multiaddr(str(maddr))
        peer_id = PeerID.from_base58(maddr["p2p"])
        if peer_id not in node.protocol.routing_table and peer_id not in pending and peer_id != node.peer_id:
            task = pending[peer_id] = asyncio.create_task(_rejoin(node, peer_id, maddr))
            task.add_done_callback(lambda _, peer_id=peer_id: pending.pop(peer_id, None))


async def _rejoin(node, peer_id, maddr) -> None:
    if not await _accepts_tcp(maddr, node.protocol.wait_timeout):
        return
    if await node.protocol.call_ping(peer_id) is not None:  # None: no answer within hivemind's wait_timeout
        node.blacklist.register_success(peer_id)
        logger.info("DHT peer %s answers again: back in the routing table", peer_id)


async def _accepts_tcp(maddr, timeout_s: float) -> bool:
    """Whether something accepts TCP connections at maddr (True where it names no TCP address).
    A peer is pinged through p2pd only once it does: each dial p2pd makes to a dead address backs
    that address off for 5 s + 1 s x (failed dials)^2, up to 5 min, and refuses every dial to it
    meanwhile. Pinged at every lookup while it was down, a restarted bootstrap was reached 13.6 s
    after it came back from a 40 s outage, 25 s after a 100 s one (by that rule up to 2.5 min after
    10 min), and a client that had lost every other peer saw no expert for as long. A refused
    connect here leaves p2pd's backoff as the first failure set it (5 s)."""
    host = next((value for proto, value in maddr.items() if proto.name in ("ip4", "ip6", "dns", "dns4", "dns6")), None)
    if host is None or "tcp" not in maddr:
        return True
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(maddr["tcp"])), timeout_s)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


async def _get_many(dht, node, keys: list[str]) -> dict:
    # Runs inside the DHT process. Latest values: a cached get can miss subkeys added later by others.
    rejoin_initial_peers(dht, node)
    found = await node.get_many(keys, sufficient_expiration_time=float("inf"))
    return {key: (_plain(value.value) if value is not None else None) for key, value in found.items()}


def _plain(value):
    """A dictionary value's entries as DHTEntry tuples of builtins. The result is pickled to the
    process that asked; hivemind's own entry type would make that process import hivemind's whole
    package (0.4 s and 35 MiB in a user's process, scipy included) to unpickle it. Any peer may
    store a plain dict under our keys: its items become entries with no value, which readers drop."""
    if not isinstance(value, dict):
        return value  # not one of our keys' dictionaries: parse_entries drops it
    return {
        subkey: DHTEntry(getattr(entry, "value", None), getattr(entry, "expiration_time", 0.0))
        for subkey, entry in value.items()
    }


def lookup_batches(keys: list[str]) -> list[list[str]]:
    """`keys` in order, split into requests of at most MAX_LOOKUP_KEY_BYTES (at least one key each)."""
    batches: list[list[str]] = []
    size = MAX_LOOKUP_KEY_BYTES
    for key in keys:
        key_bytes = len(key.encode()) + _KEY_OVERHEAD_BYTES
        if size + key_bytes > MAX_LOOKUP_KEY_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(key)
        size += key_bytes
    return batches


def get_records(dht, keys: list[str], timeout_s: float = DHT_TIMEOUT_S) -> dict:
    """Latest values of `keys` (None where absent) from a hivemind.DHT or an IsolatedDHT, in one
    request per lookup_batches() batch, each bounded by timeout_s.
    Raises NodeUnavailable if the DHT does not answer in time."""
    if hasattr(dht, "get_records"):  # an IsolatedDHT (protocol/client_dht.py): its child looks them up
        return dht.get_records(keys, timeout_s)
    found: dict = {}
    for batch in lookup_batches(keys):
        found.update(_get_batch(dht, batch, timeout_s))
    return found


def _get_batch(dht, keys: list[str], timeout_s: float) -> dict:
    if not dht.is_alive():  # it would only time out: say why at once
        raise NodeUnavailable(f"the DHT process {describe_dht_exit(dht.exitcode)}; restart this process to reach the swarm again")
    future = dht.run_coroutine(functools.partial(_get_many, keys=keys), return_future=True)
    try:
        return future.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError as e:
        future.cancel()
        raise NodeUnavailable(f"the DHT did not answer within {timeout_s:.0f} s; check --initial-peers") from e
