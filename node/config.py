"""Typed, validated node configuration (one YAML file per node, see deploy/node.example.yaml)."""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
from typing import Literal

from moeswarm.protocol.codec import WIRE_DTYPES
from moeswarm.protocol.errors import ConfigError
from moeswarm.protocol.records import MAX_RECORD_TTL_S, check_swarm_name
from moeswarm.protocol.spec import ModelSpec, check_uid_in_spec


def _is_ip(text: object) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _require(condition: bool, key: str, value: object, rule: str) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r}: {rule}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    name: Literal["sgd", "adam"] = "adam"  # optimizer applied to each hosted expert
    lr: float = 1e-3  # learning rate
    update_every: int = 1  # step once at least this many gradient rows (samples) have accumulated
    max_grad_norm: float = 0.0  # clip each expert's gradient to this total norm before a step; 0: no clipping

    def __post_init__(self) -> None:
        _require(self.name in ("sgd", "adam"), "optimizer.name", self.name, "one of 'sgd', 'adam'")
        _require(0 < self.lr < 10, "optimizer.lr", self.lr, "must be in (0, 10)")
        _require(self.update_every >= 1, "optimizer.update_every", self.update_every, "must be >= 1")
        _require(0 <= self.max_grad_norm < math.inf, "optimizer.max_grad_norm", self.max_grad_norm, "must be >= 0 (0: off)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class NodeConfig:
    model: ModelSpec  # dimensions shared by every expert of the model
    experts: tuple[str, ...] | Literal["all"] = "all"  # hosted UIDs ({model}.L{layer}.E{expert}) or "all"
    seed: int = 0  # deterministic init of experts that have no checkpoint (same seed -> same weights)
    model_dir: str | None = None  # moeswarm model directory: experts start from its weights (a checkpoint in state_dir wins)
    swarm: str = "default"  # swarm name, part of every DHT key
    host: str = "127.0.0.1"  # IP to bind gRPC and the DHT to (0.0.0.0: every interface); announced unless announce_host is set
    announce_host: str | None = None  # IP others reach this node at, if not `host` (NAT, cloud VM, host 0.0.0.0)
    port: int = 0  # gRPC port; 0 picks a free one
    dht_port: int = 0  # DHT (libp2p) TCP port; 0 picks a free one
    # TCP port of the data path (protocol/framing.py: Forward/Backward without HTTP/2, ~0.15-0.2 ms less per
    # round trip than gRPC), announced beside the gRPC endpoint; 0 picks a free one; null: gRPC only
    data_port: int | None = 0
    initial_peers: tuple[str, ...] = ()  # DHT multiaddrs to join; empty starts a new swarm
    state_dir: str | None = None  # checkpoints and the node's identity key; None keeps nothing on disk
    checkpoint_interval_s: float = 60.0  # write weights + optimizer state this often (if they changed)
    announce_ttl_s: float = 30.0  # DHT records expire after this; refreshed every third of it
    max_rows: int = 8192  # most rows one expert batch in a request may carry
    max_message_bytes: int = 64 << 20  # largest gRPC message accepted or sent
    # ExportState (a peer pulls an expert's weights; 2 at once): a peer that takes no chunk for this
    # long, or takes longer than this plus 1 s per MiB for all of them, loses the stream and its slot
    export_chunk_timeout_s: float = 30.0
    batch_max_rows: int = 8192  # most rows merged into one expert matmul across requests
    wire_dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")  # dtypes accepted on the wire
    torch_threads: int = 1  # intra-op threads for expert compute (several nodes share a machine)
    cpus: tuple[int, ...] = ()  # pin the node's threads to these CPUs (Linux); empty: the scheduler decides
    device: str = "cpu"  # where experts live and compute: "cpu", "cuda" or "cuda:N"
    activation_cache_mb: int = 256  # memory (on device) for activations training forwards keep for their backward; 0: off
    trainable: bool = True  # accept Backward (gradients) from clients; false: inference only, no one can change the experts
    sync_from_replicas: bool = True  # an expert no checkpoint restored starts from its most trained replica in the swarm;
    # an inference-only node also takes a replica's weights later, when that one has trained further
    average_every_s: float = 60.0  # trainable nodes average each expert with a trainable replica this often, inference-only
    # ones (sync_from_replicas) check for replicas trained further this often; 0: never
    prepack_weights: bool = False  # CPU serving: forward with oneDNN-prepacked weights (fp32, bf16; 1.1-1.8x faster; 2x weight memory)
    sched_batch: bool = False  # Linux: the node's threads run as SCHED_BATCH, so a request does not preempt what runs on
    # its CPU (a client on the same machine keeps its core until it waits); `swarm up` turns it on (node/affinity.py)
    busy_poll_us: int = 0  # after each answer, keep polling (not sleeping) this long: lower latency for a client calling
    # again at once (decoding), for a core's CPU time meanwhile; 0: off (node/busy_poll.py)
    optimizer: OptimizerConfig = OptimizerConfig()

    def __post_init__(self) -> None:
        try:
            check_swarm_name(self.swarm)
        except ValueError as e:
            raise ConfigError(f"swarm: {e}") from e
        if self.experts != "all":
            _require(len(self.experts) > 0, "experts", self.experts, "list at least one UID, or 'all'")
            for uid in self.experts:
                check_uid_in_spec(uid, self.model)
            _require(len(set(self.experts)) == len(self.experts), "experts", self.experts, "has duplicates")
        _require(_is_ip(self.host), "host", self.host, "must be an IP address (0.0.0.0 listens on every interface)")
        if self.announce_host is not None:
            _require(_is_ip(self.announce_host) and not ipaddress.ip_address(self.announce_host).is_unspecified,
                     "announce_host", self.announce_host, "must be the IP address others reach this node at")
            _require(self.dht_port != 0, "dht_port", self.dht_port, "set a fixed port with announce_host: the DHT announces its port before it listens")
        else:
            _require(not ipaddress.ip_address(self.host).is_unspecified, "host", self.host,
                     "listens on every interface: set announce_host to the IP others reach this node at")
        _require(0 <= self.port < 65536, "port", self.port, "must be in [0, 65535]")
        _require(0 <= self.dht_port < 65536, "dht_port", self.dht_port, "must be in [0, 65535]")
        _require(self.data_port is None or (isinstance(self.data_port, int) and 0 <= self.data_port < 65536), "data_port",
                 self.data_port, "must be in [0, 65535], or null (off)")
        # Bounded: .inf was taken, and then a node never checkpointed before it stopped (a kill -9 lost
        # all its training), or its records never expired (a node gone stayed in every client's view).
        _require(0 < self.checkpoint_interval_s <= 86400, "checkpoint_interval_s", self.checkpoint_interval_s, "must be in (0, 86400] seconds")
        _require(3 <= self.announce_ttl_s <= MAX_RECORD_TTL_S, "announce_ttl_s", self.announce_ttl_s, f"must be in [3, {MAX_RECORD_TTL_S}] seconds")
        _require(1 <= self.max_rows <= 1 << 20, "max_rows", self.max_rows, "must be in [1, 1048576]")
        _require(self.batch_max_rows >= 1, "batch_max_rows", self.batch_max_rows, "must be >= 1")
        _require(
            4096 <= self.max_message_bytes <= 2**31 - 1, "max_message_bytes", self.max_message_bytes, "must be in [4096, 2^31-1]"
        )
        _require(0 < self.export_chunk_timeout_s <= 3600, "export_chunk_timeout_s", self.export_chunk_timeout_s, "must be in (0, 3600] seconds")
        _require("float32" in self.wire_dtypes, "wire_dtypes", self.wire_dtypes, "must include float32")
        for dtype in self.wire_dtypes:
            _require(dtype in WIRE_DTYPES, "wire_dtypes", dtype, f"not one of {sorted(WIRE_DTYPES)}")
        _require(1 <= self.torch_threads <= 256, "torch_threads", self.torch_threads, "must be in [1, 256]")
        _require(all(0 <= cpu < 1 << 16 for cpu in self.cpus), "cpus", self.cpus, "CPU numbers must be in [0, 65535]")
        _require(len(set(self.cpus)) == len(self.cpus), "cpus", self.cpus, "has duplicates")
        _require(0 <= self.activation_cache_mb <= 1 << 20, "activation_cache_mb", self.activation_cache_mb, "must be in [0, 1048576]")
        _require(
            isinstance(self.device, str) and re.fullmatch(r"cpu|cuda(:\d{1,3})?", self.device) is not None,
            "device", self.device, "one of 'cpu', 'cuda', 'cuda:N'",
        )
        _require(self.average_every_s == 0 or 1 <= self.average_every_s <= 86400, "average_every_s", self.average_every_s,
                 "must be 0 (off) or in [1, 86400] seconds")
        _require(0 <= self.busy_poll_us <= 1_000_000, "busy_poll_us", self.busy_poll_us, "must be in [0, 1000000] microseconds (0: off)")
        _require(not self.prepack_weights or self.device == "cpu", "prepack_weights", self.prepack_weights, f"is for CPU nodes, not device={self.device!r}")

    @property
    def public_host(self) -> str:
        """The address this node announces: announce_host, or the address it binds to."""
        return self.announce_host or self.host

    def exposure_warning(self) -> str | None:
        """What to tell the operator of a node others can reach and train, or None (loopback, or
        inference only): every client that reaches it can move its experts."""
        if not self.trainable or ipaddress.ip_address(self.public_host).is_loopback:
            return None
        clip = "" if self.optimizer.max_grad_norm else " and consider optimizer.max_grad_norm"
        return (
            f"this node accepts gradients from anyone who reaches {self.public_host}: "
            f"set trainable: false to serve inference only{clip}"
        )

    def hosted_uids(self) -> tuple[str, ...]:
        return tuple(self.model.all_uids()) if self.experts == "all" else self.experts
