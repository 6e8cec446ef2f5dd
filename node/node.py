"""ExpertNode: one process that hosts experts, serves them over gRPC and announces them in the DHT."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import pathlib
import secrets
import tempfile
import time

import grpc
import hivemind
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from moeswarm.node.announcer import Announcer
from moeswarm.node.batcher import Batcher
from moeswarm.node.busy_poll import BusyPoller
from moeswarm.node.checkpoint import (
    EXPERTS_DIR, MOVE_AWAY, P2P_IDENTITY_NAME, Checkpointer, holds_lock, iter_checkpoints, load_or_create_identity, lock_state_dir,
    os_failure, remove_unfinished_writes, write_identity,
)
from moeswarm.node.config import NodeConfig
from moeswarm.node.data_server import DataServer
from moeswarm.node.model_source import check_swarm_agrees, expert_origins, load_expert_modules
from moeswarm.node.registry import ExpertRegistry
from moeswarm.node.replica_sync import ReplicaSync
from moeswarm.node.service import SERVICE_NAME, ExpertServicer
from moeswarm.node.validation import Limits
from moeswarm.protocol import expert_pb2
from moeswarm.protocol.errors import CheckpointError, ConfigError, StartupError
from moeswarm.protocol.dht import describe_dht_exit, dht_start_failure, grpc_endpoint, start_dht, stop_dht, wait_dht_ready
from moeswarm.protocol.records import ExpertRecord, NodeRecord, dht_subkey, signer_peer_id

logger = logging.getLogger(__name__)
SHUTDOWN_GRACE_S = 2.0
WITHDRAW_TIMEOUT_S = 1.5  # at shutdown, alongside the grace period: SIGTERM to exit stays under 5 s
# Batches up to this many FLOPs per expert run inline on the event loop while the compute thread is
# idle. A few rows cost about one pass over the expert's weights whatever their number (memory-bound),
# and a hand-off to the compute thread and back wakes two threads: 2 MFLOP (1-2 rows of a 256x512
# expert) sent batch-8 decoding's 3-4-row batches to the thread; 8 MFLOP took bench/generate.py's
# batch-8 step from 1.23-1.37 to 1.11-1.22 ms per MoE layer over the local step (658-679 -> 696-734
# tokens/s; 3 alternating pairs), batch 1 unchanged, bench/remote_moe.py forward at batch 16 +12%.
INLINE_FLOPS = 8_000_000


def compute_device(name: str) -> torch.device:
    """The torch device of config.device, checked against this machine (ConfigError if absent)."""
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device={name!r}: torch sees no CUDA device on this machine (torch {torch.__version__})")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device={name!r}: this machine has {count} CUDA device(s), numbered from 0")
    return device


class ExpertNode:
    def __init__(self, config: NodeConfig):
        # Per-thread in OpenMP: set here for the event-loop thread (validation, codec) and in the
        # compute thread's initializer below; a default of all cores stalls on a shared machine.
        torch.set_num_threads(config.torch_threads)
        self.device = compute_device(config.device)
        self.config = config
        self.uids = config.hosted_uids()
        self.state_dir = pathlib.Path(config.state_dir) if config.state_dir else None
        self.endpoint = ""
        self.data_port = 0  # the data port's number once it listens (0: off, config data_port null)
        self._data_server: DataServer | None = None
        self.peer_id = ""  # known once the DHT peer is up
        self.dht: hivemind.DHT | None = None
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task] = []
        self._restored: set[str] = set()  # experts a checkpoint restored
        self._lock = None  # the open lock file of state_dir, held while the node runs
        self._identity = None  # the node's RSA key (load_or_create_identity), written again if state_dir goes
        self._identity_dir: tempfile.TemporaryDirectory | None = None  # without a state_dir: the key file p2pd reads
        self._serving = False  # set once start() completed; a node that failed to start writes nothing
        self._loop: asyncio.AbstractEventLoop | None = None  # the serving loop, set by start()
        self._process_id = secrets.token_hex(6)  # with an expert's revision, names the weights it holds (ExpertRecord.state)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="expert-compute", initializer=torch.set_num_threads, initargs=(config.torch_threads,)
        )

    async def start(self) -> None:
        """Start the DHT (it forks, so before any gRPC object), load experts and serve while it joins
        the swarm, then check the swarm agrees on the model and announce."""
        config = self.config
        self._loop = asyncio.get_running_loop()
        self._lock = lock_state_dir(self.state_dir) if self.state_dir is not None else None
        if self.state_dir is not None:
            remove_unfinished_writes(self.state_dir)
        identity = self._identity = load_or_create_identity(self.state_dir)
        identity_path = self._identity_file(identity)
        self.dht = start_dht(  # one key for p2pd and for signing: readers take a record's peer id from its signer
            initial_peers=config.initial_peers, host=config.host, port=config.dht_port, private_key=identity,
            await_ready=False, announce_host=config.announce_host, identity_path=str(identity_path),
        )
        modules = load_expert_modules(config.model_dir, config.model, self.uids, self.device) if config.model_dir else None
        self.registry = ExpertRegistry(
            config.model, self.uids, seed=config.seed, optimizer=config.optimizer, modules=modules, device=self.device,
            activation_cache_bytes=config.activation_cache_mb << 20, prepack_weights=config.prepack_weights,
            origins=expert_origins(config.model_dir, self.uids) if config.model_dir else None,
        )
        if self.state_dir is not None:
            self._checkpointer = Checkpointer(self.state_dir, self._fingerprint, self._snapshot)
        self._restore()
        if (warning := config.exposure_warning()) is not None:
            logger.warning(warning)
        inline_rows = INLINE_FLOPS // (6 * config.model.d_model * config.model.d_ff)
        self.batcher = Batcher(self._compute, self._executor, max_rows=config.batch_max_rows, inline_rows=inline_rows)
        await self._start_server()
        try:
            await asyncio.to_thread(wait_dht_ready, self.dht)
        except Exception as e:  # hivemind's P2PDaemonError & co: say what to check, without a traceback
            raise StartupError(dht_start_failure(e, config.initial_peers)) from e
        self._forget_identity_file()
        self.peer_id = str(self.dht.peer_id)
        if self.peer_id != (signer := signer_peer_id(dht_subkey(identity))):  # readers would know its records by another id
            raise StartupError(
                f"p2pd did not take {identity_path} as its identity (peer id {self.peer_id}, the key's is {signer}); "
                "move the file away to make a new one"
            )
        if config.initial_peers:
            await check_swarm_agrees(self.dht, config.swarm, config.model, self.peer_id)
        self.replicas = ReplicaSync(
            dht=self.dht, swarm=config.swarm, peer_id=self.peer_id, registry=self.registry, batcher=self.batcher,
            max_message_bytes=config.max_message_bytes,
        )
        if config.initial_peers and config.sync_from_replicas:  # before announcing: never serve stale weights
            await self.replicas.adopt_newest([uid for uid in self.uids if uid not in self._restored])
        self.announcer = Announcer(
            self.dht, swarm=config.swarm, subkey=dht_subkey(identity), ttl_s=config.announce_ttl_s, records=self._records
        )
        # serving without records for a refresh period beats failing to start over one slow store
        await self.announcer.announce()
        self._tasks = [asyncio.create_task(self.announcer.run()), asyncio.create_task(self._checkpoint_loop())]
        if config.average_every_s > 0 and (config.trainable or config.sync_from_replicas):
            # trainable: average with replicas; inference only: follow the most trained one
            self._tasks.append(asyncio.create_task(self.replicas.run(config.average_every_s, follow=not config.trainable)))
        self._serving = True
        # Everything loaded so far (torch, hivemind, grpc, the experts: ~175k objects) lives as long as
        # the node: move it out of the cyclic GC's view, or every full collection walks it again (one
        # took 116 ms in 40 s of batch-1 serving, a stall every client saw; after freezing, 1.1 ms).
        # Collect first, so no start-up garbage is frozen with it (frozen cycles are never freed).
        gc.collect()
        gc.freeze()
        logger.info("serving %d experts of %s on %s", len(self.uids), config.model.name, self.endpoint)

    def _identity_file(self, identity) -> pathlib.Path:
        """The key file p2pd takes its identity from: state_dir's, or a private temporary one."""
        if self.state_dir is not None:
            return self.state_dir / P2P_IDENTITY_NAME
        self._identity_dir = tempfile.TemporaryDirectory(prefix="moeswarm-identity-")
        return write_identity(identity, pathlib.Path(self._identity_dir.name) / P2P_IDENTITY_NAME)

    def _forget_identity_file(self) -> None:
        """p2pd has read it: a temporary key file goes."""
        if self._identity_dir is not None:
            self._identity_dir.cleanup()
            self._identity_dir = None

    async def _start_server(self) -> None:
        config = self.config
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a taken port must fail, not be shared with another node
        ]
        self._server = grpc.aio.server(options=options)
        limits = Limits(config.model, frozenset(self.uids), config.max_rows, frozenset(config.wire_dtypes))
        self._servicer = ExpertServicer(
            self.batcher, limits, self.info, trainable=config.trainable, export=self._export_state,
            max_message_bytes=config.max_message_bytes, export_chunk_timeout_s=config.export_chunk_timeout_s,
            poller=BusyPoller(config.busy_poll_us * 1e-6, lambda: self.batcher.compute_busy),
        )
        self._server.add_generic_rpc_handlers([self._servicer.generic_handler()])
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        try:
            port = self._server.add_insecure_port(grpc_endpoint(config.host, config.port))
        except RuntimeError as e:
            raise ConfigError(f"port={config.port}: cannot bind gRPC on {config.host} ({e})") from e
        self.endpoint = grpc_endpoint(config.public_host, port)  # what the DHT records tell clients
        await self._server.start()
        if config.data_port is not None:
            self._data_server = DataServer(self._servicer, max_message_bytes=config.max_message_bytes)
            try:
                self.data_port = await self._data_server.start(config.host, config.data_port)
            except OSError as e:
                raise ConfigError(f"data_port={config.data_port}: cannot listen on {config.host} ({e}); null turns the data port off") from e
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

    @property
    def data_endpoint(self) -> str | None:
        """host:port of the data port as clients reach it (None: off)."""
        return grpc_endpoint(self.config.public_host, self.data_port) if self.data_port else None

    async def _export_state(self, uid: str) -> tuple[int, dict[str, torch.Tensor]]:
        return await self.batcher.run_on_compute_thread(self.registry.export_state, uid)

    def dht_failure(self) -> str | None:
        """Why this node's DHT process is gone, or None while it runs. Without it the node cannot
        refresh its records, so it would drop out of the swarm one TTL later while still serving."""
        if self.dht is None or self.dht.is_alive():
            return None
        return f"the node's DHT process (pid {self.dht.pid}) {describe_dht_exit(self.dht.exitcode)}"

    def dht_maddrs(self) -> list[str]:
        return [str(maddr) for maddr in self.dht.get_visible_maddrs()]

    def _compute(self, uid: str, op: str, x_ND: torch.Tensor, g_ND: torch.Tensor | None, tags) -> torch.Tensor:
        """On the compute thread (or inline on the loop for tiny batches)."""
        if op == "forward":
            return self.registry.forward(uid, x_ND, tags)
        if op == "input_grad":
            return self.registry.input_grad(uid, x_ND, g_ND)
        grad_x_ND = self.registry.backward(uid, x_ND, g_ND, tags, defer_step=True)
        if self.registry.experts[uid].step_due:
            # The optimizer step runs after the answer leaves, not before (until then any request
            # for this expert applies it first, so none computes with stale weights).
            self._loop.call_soon_threadsafe(self.batcher.after_answers, self.registry.apply_due_step, uid)
        return grad_x_ND

    def info(self) -> expert_pb2.InfoResponse:
        spec = self.config.model
        return expert_pb2.InfoResponse(
            model=expert_pb2.ModelSpecMsg(
                name=spec.name, d_model=spec.d_model, d_ff=spec.d_ff, n_layers=spec.n_layers, n_experts=spec.n_experts
            ),
            experts=[
                expert_pb2.ExpertState(uid=uid, version=hosted.visible_version, rows_served=hosted.rows_served)
                for uid, hosted in self.registry.experts.items()
            ],
            queue_depth=self.batcher.queued_rows,
            rows_per_s=self.batcher.meter.rate(),
            wire_dtypes=list(self.config.wire_dtypes),
            max_rows=self.config.max_rows,
            max_message_bytes=self.config.max_message_bytes,
            peer_id=self.peer_id,
            reused_activation_rows=self.registry.kept.reused_rows,
        )

    def _records(self) -> tuple[NodeRecord, dict[str, ExpertRecord]]:
        load = dict(peer_id=self.peer_id, endpoint=self.endpoint, data_port=self.data_port, queue_depth=self.batcher.queued_rows)
        load["rows_per_s"] = self.batcher.meter.rate()
        spec = self.config.model
        node = NodeRecord(**load, model=vars(spec).copy(), uids=self.uids)
        wire = tuple(self.config.wire_dtypes)
        experts = {
            uid: ExpertRecord(
                **load, version=hosted.visible_version, wire_dtypes=wire, trainable=self.config.trainable,
                state=f"{self._process_id}.{hosted.revision}",  # unique per process start, then per weight change
                origin=hosted.origin,
            )
            for uid, hosted in self.registry.experts.items()
        }
        return node, experts

    def _restore(self) -> None:
        if self.state_dir is None:
            logger.warning("no state_dir: expert weights and optimizer state will not survive a restart")
            return
        for state, own, path in iter_checkpoints(self.state_dir, self.uids):
            try:
                restored = self.registry.load_state_dict(state)
            except (ValueError, KeyError, TypeError, RuntimeError) as e:
                misfit = f"it has no {e.args[0]!r} entry" if isinstance(e, KeyError) else e
                raise ConfigError(
                    f"checkpoint {path} does not fit this node: {misfit}; start the node with the model it was "
                    f"written for, or {MOVE_AWAY}"
                ) from e
            self._restored.update(restored)
            if own:  # rewritten once the expert changes; the old single file's experts at the first checkpoint
                self._checkpointer.saved.update(self.registry.fingerprint(restored))
            del state  # before the next file: one expert's copy at a time beside the weights
        # An expert no checkpoint holds is what its seed or model directory make again at the next
        # start: written once it changes (trained, or taken from a replica), not copied to disk as is.
        self._checkpointer.saved.update(self.registry.fingerprint([uid for uid in self.uids if uid not in self._restored]))
        if not self._restored:
            source = f"the model directory {self.config.model_dir}" if self.config.model_dir else f"seed {self.config.seed}"
            logger.info("no checkpoint in %s: starting %d experts from %s", self.state_dir, len(self.uids), source)
            return
        logger.info("resumed %d of %d experts from %s", len(self._restored), len(self.uids), self.state_dir)

    async def checkpoint(self) -> bool:
        """Save every expert that changed since its last save (node/checkpoint.py Checkpointer: one
        at a time, requests served in between); returns whether it wrote."""
        if self.state_dir is None:
            return False
        if not holds_lock(self.state_dir, self._lock):
            self._take_state_dir_again()
        started = time.monotonic()
        written = await self._checkpointer.save(self.uids)
        if written:
            logger.info(
                "checkpoint written: %d of %d experts to %s in %.2f s",
                written, len(self.uids), self.state_dir / EXPERTS_DIR, time.monotonic() - started,
            )
        return written > 0

    def _take_state_dir_again(self) -> None:
        """state_dir, or its lock, was removed or replaced while the node ran: lock it again and write
        all of it (identity, every expert), not only what changed since, for what was there is gone."""
        try:
            lock = lock_state_dir(self.state_dir)  # another node may have taken it meanwhile: then write nothing
            write_identity(self._identity, self.state_dir / P2P_IDENTITY_NAME)
        except (ConfigError, OSError) as e:
            reason = os_failure(e) or str(e)
            raise CheckpointError(f"state_dir {self.state_dir} was removed while this node ran, and cannot be made again: {reason}", reason) from e
        self._lock.close()
        self._lock = lock
        self._checkpointer.saved.clear()
        logger.warning("state_dir %s was removed or replaced while this node ran: writing its identity and all %d experts again", self.state_dir, len(self.uids))

    async def _fingerprint(self, uids: list[str]) -> dict:
        return await self.batcher.run_on_compute_thread(self.registry.fingerprint, uids)

    async def _snapshot(self, uid: str) -> tuple[dict, dict]:
        """On the compute thread: no forward/backward can run halfway through it."""
        return await self.batcher.run_on_compute_thread(lambda: (self.registry.fingerprint([uid]), self.registry.state_dict([uid])))

    async def _checkpoint_loop(self) -> None:
        """Checkpoint every interval. A disk that refuses (full, read-only) is reported once, not at
        every interval, and again when its cause changes; the node serves on and says when it can write again."""
        failing = None  # CheckpointError.reason of the failure last reported, until a checkpoint succeeds
        interval_s = self.config.checkpoint_interval_s
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.checkpoint()
            except CheckpointError as e:
                if e.reason != failing:
                    logger.error("checkpoint failed: %s. Serving on, trying again every %g s (reported once)", e, interval_s)
                failing = e.reason
                continue
            except Exception:  # task boundary: a bug; keep serving, try again next interval
                logger.error("checkpoint failed; will retry", exc_info=True)
                continue
            if failing is not None:
                logger.info("checkpoints are written to %s again", self.state_dir)
                failing = None

    async def stop(self) -> None:
        """Stop taking requests, let in-flight ones finish, checkpoint, leave the DHT."""
        for task in self._tasks:
            task.cancel()
        # Leave the swarm's views first: clients move to other replicas at their next refresh.
        withdrawing = asyncio.ensure_future(self.announcer.withdraw(WITHDRAW_TIMEOUT_S)) if self._serving else None
        if self._server is not None:
            await self._health.enter_graceful_shutdown()
            self._servicer.close_idle_streams()
            await asyncio.gather(
                self._server.stop(SHUTDOWN_GRACE_S), *([self._data_server.close(SHUTDOWN_GRACE_S)] if self._data_server else [])
            )
        if withdrawing is not None:
            await withdrawing
        try:
            if self._serving:  # never overwrite a checkpoint this node refused or did not load
                await self.checkpoint()
        except CheckpointError as e:
            raise CheckpointError(f"the last checkpoint failed, so the updates since the one before are lost: {e}", e.reason) from e
        finally:
            self._executor.shutdown(wait=True)
            if self.dht is not None:
                stop_dht(self.dht)
            self._forget_identity_file()
            if self._lock is not None:
                self._lock.close()
