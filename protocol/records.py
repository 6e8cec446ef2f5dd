"""DHT key layout and record schemas. Readers validate every record and drop what does not parse.

Keys (see shared/DESIGN.md):
  moeswarm:{swarm}:expert:{uid}  subkey per hosting node -> ExpertRecord
  moeswarm:{swarm}:nodes         subkey per node         -> NodeRecord (lets `status` list a swarm)
Subkeys are the writer's RSA public-key marker, so hivemind's RSASignatureValidator lets a peer
write only its own entry; signatures are checked by every DHT peer on store and on read.
A node signs with its libp2p key, so the peer id a reader gives an entry is the one that key
derives (signer_peer_id), whatever the entry claims: no peer can speak under another's peer id.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import re
import time
from typing import Any, TypeVar

from moeswarm.protocol.codec import WIRE_DTYPES
from moeswarm.protocol.errors import BadRequest
from moeswarm.protocol.spec import MAX_EXPERTS_PER_MODEL, ModelSpec, parse_uid

logger = logging.getLogger(__name__)

_SWARM_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # fullmatch: "$" would allow a trailing "\n"
_ENDPOINT_RE = re.compile(r"[A-Za-z0-9.\-\[\]:]{1,253}:\d{1,5}")
_OWNER_RE = re.compile(rb"\[owner:([^\]]+)\]")  # RSASignatureValidator's marker, the whole subkey (fullmatch)
_ORIGIN_RE = re.compile(r"[0-9a-f]{16}")  # ExpertRecord.origin (fullmatch)
MAX_UIDS_PER_NODE = MAX_EXPERTS_PER_MODEL  # a node serves experts of one model


def dht_validators(private_key=None) -> list:
    """Record validators every moeswarm DHT peer must use: they sign our entries and strip and check
    others' signatures (a peer without them cannot even parse signed records), and refuse records
    that no owner signs (OwnerSignedOnly)."""
    from hivemind.dht.crypto import RSASignatureValidator

    return [RSASignatureValidator(private_key), OwnerSignedOnly()]


MAX_RECORD_TTL_S = 86400  # the longest a node's records may live (node config announce_ttl_s)
# Clocks of DHT peers differ (hivemind's DHT time is each machine's wall clock): room for that.
RECORD_CLOCK_SLACK_S = 3600


class OwnerSignedOnly:
    """A hivemind record validator (its RecordValidatorBase interface, not its class: importing that
    would load hivemind into every process that reads records) for records under an owner-marker
    subkey only; RSASignatureValidator, which runs too, checks their signatures. hivemind accepts a
    record that no key protects, and a plain value with a later expiration replaces a key's whole
    dictionary and refuses every signed entry stored there afterwards: one such store, expiring
    years away, took an expert or the node list out of the swarm for good. moeswarm stores nothing
    else: a peer refuses such records when asked to store them, and a reader drops them. Nor does
    moeswarm store a record expiring later than MAX_RECORD_TTL_S from now: a signed one that did
    would keep a node that is gone in every peer's view (status, clients) for as long as it says."""

    priority = 0  # validated after the signature validator (priority 10) checked and stripped it

    def validate(self, record) -> bool:
        if record.expiration_time > time.time() + MAX_RECORD_TTL_S + RECORD_CLOCK_SLACK_S:
            return False
        return _OWNER_RE.search(record.subkey) is not None  # in the msgpack-serialised subkey

    def sign_value(self, record) -> bytes:
        return record.value

    def strip_value(self, record) -> bytes:
        return record.value

    def merge_with(self, other) -> bool:
        return isinstance(other, OwnerSignedOnly)  # one is enough


def dht_subkey(private_key) -> bytes:
    """The subkey a node writes its entries under: its public-key marker, so only it can sign them."""
    from hivemind.dht.crypto import RSASignatureValidator

    return RSASignatureValidator(private_key).local_public_key


@functools.lru_cache(maxsize=4096)
def signer_peer_id(subkey: bytes) -> str | None:
    """The libp2p peer id of the RSA key an entry under `subkey` is signed with (the DHT checked the
    signature against the key in the marker), or None where the subkey is not exactly one owner
    marker: such an entry is signed by no one, and anyone may overwrite it."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    match = _OWNER_RE.fullmatch(subkey) if isinstance(subkey, bytes) else None
    if match is None:
        return None
    try:
        public_key = serialization.load_ssh_public_key(match[1])
    except (ValueError, UnsupportedAlgorithm):
        return None
    if not isinstance(public_key, rsa.RSAPublicKey):
        return None
    return _libp2p_peer_id(public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def _libp2p_peer_id(rsa_public_der: bytes) -> str:
    """libp2p's peer id of an RSA public key (DER SubjectPublicKeyInfo): base58 of the sha2-256
    multihash of the key's protobuf (crypto.proto PublicKey{key_type: RSA = 0, data}), as p2pd derives it."""
    import base58

    length, varint = len(rsa_public_der), b""
    while length >= 0x80:
        varint += bytes([length & 0x7F | 0x80])
        length >>= 7
    encoded = b"\x08\x00\x12" + varint + bytes([length]) + rsa_public_der
    return base58.b58encode(b"\x12\x20" + hashlib.sha256(encoded).digest()).decode()


# What a node stores over each of its entries when it stops cleanly (node/announcer.py): readers drop
# it, so the node leaves `status` and clients' views at their next read, not when its records expire
# (announce_ttl_s later). Not a valid record, so peers from before it drop it too.
DEPARTED: dict[str, Any] = {"departed": True}


def is_departed(value: Any) -> bool:
    return isinstance(value, dict) and value.get("departed") is True


def expert_key(swarm: str, uid: str) -> str:
    return f"moeswarm:{swarm}:expert:{uid}"


def nodes_key(swarm: str) -> str:
    return f"moeswarm:{swarm}:nodes"


def check_swarm_name(swarm: str) -> str:
    if not _SWARM_RE.fullmatch(swarm):
        raise ValueError(f"swarm name {swarm!r}: use 1-64 chars of [a-z0-9_-]")
    return swarm


@dataclasses.dataclass(frozen=True)
class _Record:
    """A DHT record: typed fields checked on construction (ValueError names the field). Plain
    dataclasses, not pydantic: building pydantic models cost every process ~0.15 s at import.
    `model_validate` reads a dict from the DHT, ignoring fields it does not know, so records written
    by newer peers stay readable; `model_dump` gives the dict to store."""

    peer_id: str
    endpoint: str  # gRPC host:port
    queue_depth: int  # rows waiting for compute
    rows_per_s: float  # recent throughput
    # the node's data port (protocol/framing.py) on the endpoint's host; 0: none (gRPC only, or an older peer)
    data_port: int = dataclasses.field(default=0, kw_only=True)

    def __post_init__(self) -> None:
        _text(self, "peer_id", max_length=128)
        endpoint = _text(self, "endpoint", max_length=260)
        if not _ENDPOINT_RE.fullmatch(endpoint) or not 0 < int(endpoint.rsplit(":", 1)[1]) < 65536:
            raise ValueError(f"bad endpoint {endpoint[:64]!r}")
        _integer(self, "queue_depth")
        _integer(self, "data_port")
        if self.data_port > 65535:
            raise ValueError(f"data_port must be a TCP port (0: none), got {self.data_port}")
        rate = self.rows_per_s
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < math.inf:
            raise ValueError(f"rows_per_s must be a finite number >= 0, got {str(rate)[:32]!r}")
        object.__setattr__(self, "rows_per_s", float(rate))

    @classmethod
    def model_validate(cls: type[RecordT], data: Any) -> RecordT:
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__} must be a dictionary, got {type(data).__name__}")
        names = {field.name for field in dataclasses.fields(cls)}
        missing = [field.name for field in dataclasses.fields(cls) if field.name not in data and _required(field)]
        if missing:
            raise ValueError(f"{cls.__name__} lacks {', '.join(missing)}")
        return cls(**{name: value for name, value in data.items() if name in names})

    def model_dump(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    @property
    def data_endpoint(self) -> str | None:
        """host:port of the node's data port, or None if it announces none."""
        return f"{self.endpoint.rsplit(':', 1)[0]}:{self.data_port}" if self.data_port else None


@dataclasses.dataclass(frozen=True)
class ExpertRecord(_Record):
    """One node's entry for one hosted expert."""

    version: int  # optimizer steps applied to this replica (one started from a peer counts the peer's steps)
    wire_dtypes: tuple[str, ...] = ("float32",)
    trainable: bool = True  # accepts Backward; False: inference only (records from before this field: True)
    # names the weights this replica holds now: it changes whenever they change ("" from peers before this field)
    state: str = ""
    # names the weights this replica's line of training started from (a model directory's, or the
    # seed's init: model/experts.py expert_origin); "" where unknown (Hugging Face checkpoints, older peers)
    origin: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        _integer(self, "version")
        if self.state != "":
            _text(self, "state", max_length=64)
        if self.origin != "" and not is_origin(self.origin):
            raise ValueError(f"origin must be empty or 16 hex digits, got {str(self.origin)[:32]!r}")
        if not isinstance(self.trainable, bool):
            raise ValueError(f"trainable must be a boolean, got {str(self.trainable)[:32]!r}")
        dtypes = _strings(self, "wire_dtypes", max_items=64)
        known = tuple(dtype for dtype in dtypes if dtype in WIRE_DTYPES)  # unknown = newer peer: skip
        if "float32" not in known:
            raise ValueError("wire_dtypes must include float32")
        object.__setattr__(self, "wire_dtypes", known)


def is_origin(value: Any) -> bool:
    """A well-formed ExpertRecord.origin: 16 hex digits (model/experts.py expert_origin)."""
    return isinstance(value, str) and _ORIGIN_RE.fullmatch(value) is not None


def same_origin(a: str, b: str) -> bool:
    """Whether two replicas' weights may descend from the same weights: yes unless both origins are
    known and differ."""
    return not a or not b or a == b


@dataclasses.dataclass(frozen=True)
class NodeRecord(_Record):
    """One node's entry in the swarm's node list."""

    model: dict[str, Any]  # ModelSpec fields
    uids: tuple[str, ...]  # experts of that model, each once

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.model, dict):
            raise ValueError(f"model must be a dictionary, got {type(self.model).__name__}")
        uids = _strings(self, "uids", max_items=MAX_UIDS_PER_NODE)
        _check_experts_of(uids, self.model)
        object.__setattr__(self, "uids", uids)


def _check_experts_of(uids: tuple[str, ...], model: dict[str, Any]) -> None:
    """Every UID is well formed, named once, and an expert of the announced model (of its spec, where
    that parses: a newer peer's spec with fields we do not know cannot be checked further)."""
    if len(set(uids)) != len(uids):
        raise ValueError("uids must not repeat an expert")
    spec = ModelSpec.from_record(model)
    for uid in uids:
        try:
            parsed = parse_uid(uid)
        except BadRequest as e:
            raise ValueError(f"uids: {e}") from None
        if parsed.model != model.get("name") or (spec is not None and not spec.has_expert(parsed.layer, parsed.expert)):
            raise ValueError(f"uids: {uid!r} is not an expert of the announced model {str(model.get('name'))[:64]!r}")


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _text(record: _Record, name: str, *, max_length: int) -> str:
    value = getattr(record, name)
    if not isinstance(value, str) or not 0 < len(value) <= max_length:
        raise ValueError(f"{name} must be a string of 1 to {max_length} characters, got {str(value)[:32]!r}")
    return value


def _integer(record: _Record, name: str) -> None:
    value = getattr(record, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {str(value)[:32]!r}")


def _strings(record: _Record, name: str, *, max_items: int) -> tuple[str, ...]:
    value = getattr(record, name)
    if not isinstance(value, (list, tuple)) or len(value) > max_items or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a list of at most {max_items} strings")
    return tuple(value)


RecordT = TypeVar("RecordT", bound=_Record)


def parse_entries(value: Any, record_type: type[RecordT]) -> dict[bytes, RecordT]:
    """Parse a DHT dictionary value {subkey: entry with a .value} (dht.DHTEntry, as get_records returns
    it) into records, one per signer; drop invalid ones and those under a subkey no one signs. A
    record's peer_id is its signer's (signer_peer_id): what a record claims is replaced, so a peer
    can neither pose as another (to replace its entry in `status`, lead its replicas' averaging or
    be skipped as itself) nor pick an id of its choice. A node's own entries claim exactly its
    signer's id."""
    if not isinstance(value, dict):
        return {}
    records = {}
    for subkey, entry in value.items():
        signer = signer_peer_id(subkey)
        if signer is None:
            logger.debug("dropping %s under subkey %.40r: not signed by an owner key", record_type.__name__, subkey)
            continue
        data = getattr(entry, "value", None)
        if is_departed(data):
            continue
        try:
            record = record_type.model_validate(data)
        except (ValueError, TypeError) as e:
            logger.debug("dropping invalid %s of %s: %s", record_type.__name__, signer, e)
            continue
        if record.peer_id != signer:
            logger.debug("%s of %s claims peer id %.64r: read as its signer's", record_type.__name__, signer, record.peer_id)
            record = dataclasses.replace(record, peer_id=signer)
        records[subkey] = record
    return records
