"""DHT key layout and record schemas. Readers validate every record and drop what does not parse.

Keys (see shared/DESIGN.md):
  moeswarm:{swarm}:expert:{uid}  subkey per hosting node -> ExpertRecord
  moeswarm:{swarm}:nodes         subkey per node         -> NodeRecord (lets `status` list a swarm)
Subkeys are the writer's RSA public-key marker, so hivemind's RSASignatureValidator lets a peer
write only its own entry; signatures are checked by every DHT peer on store and on read.
"""

from __future__ import annotations

import logging
import re
from typing import Any, TypeVar

import pydantic

from moeswarm.protocol.codec import WIRE_DTYPES

logger = logging.getLogger(__name__)

_SWARM_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # fullmatch: "$" would allow a trailing "\n"
_ENDPOINT_RE = re.compile(r"[A-Za-z0-9.\-\[\]:]{1,253}:\d{1,5}")
MAX_UIDS_PER_NODE = 100_000


def dht_validators(private_key=None) -> list:
    """Record validators every moeswarm DHT peer must use: they sign our entries and strip and check
    others' signatures (a peer without them cannot even parse signed records)."""
    from hivemind.dht.crypto import RSASignatureValidator

    return [RSASignatureValidator(private_key)]


def dht_subkey(private_key) -> bytes:
    """The subkey a node writes its entries under: its public-key marker, so only it can sign them."""
    from hivemind.dht.crypto import RSASignatureValidator

    return RSASignatureValidator(private_key).local_public_key


def expert_key(swarm: str, uid: str) -> str:
    return f"moeswarm:{swarm}:expert:{uid}"


def nodes_key(swarm: str) -> str:
    return f"moeswarm:{swarm}:nodes"


def check_swarm_name(swarm: str) -> str:
    if not _SWARM_RE.fullmatch(swarm):
        raise ValueError(f"swarm name {swarm!r}: use 1-64 chars of [a-z0-9_-]")
    return swarm


class _Record(pydantic.BaseModel):
    # Newer peers may add fields: ignore what we do not know, so they stay readable.
    model_config = pydantic.ConfigDict(extra="ignore", frozen=True)

    peer_id: str = pydantic.Field(min_length=1, max_length=128)
    endpoint: str  # gRPC host:port
    queue_depth: int = pydantic.Field(ge=0)  # rows waiting for compute
    rows_per_s: float = pydantic.Field(ge=0, allow_inf_nan=False)  # recent throughput

    @pydantic.field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, value: str) -> str:
        if not _ENDPOINT_RE.fullmatch(value) or not 0 < int(value.rsplit(":", 1)[1]) < 65536:
            raise ValueError(f"bad endpoint {value[:64]!r}")
        return value


class ExpertRecord(_Record):
    """One node's entry for one hosted expert."""

    version: int = pydantic.Field(ge=0)  # optimizer steps applied to this replica
    wire_dtypes: tuple[str, ...] = ("float32",)

    @pydantic.field_validator("wire_dtypes")
    @classmethod
    def _known_dtypes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        known = tuple(dtype for dtype in value if dtype in WIRE_DTYPES)  # unknown = newer peer: skip
        if "float32" not in known:
            raise ValueError("wire_dtypes must include float32")
        return known


class NodeRecord(_Record):
    """One node's entry in the swarm's node list."""

    model: dict[str, Any]  # ModelSpec fields
    uids: tuple[str, ...] = pydantic.Field(max_length=MAX_UIDS_PER_NODE)


RecordT = TypeVar("RecordT", bound=_Record)


def parse_entries(value: Any, record_type: type[RecordT]) -> dict[bytes, RecordT]:
    """Parse a DHT dictionary value {subkey: ValueWithExpiration} into records; drop invalid ones."""
    if not isinstance(value, dict):
        return {}
    records = {}
    for subkey, entry in value.items():
        try:
            records[subkey] = record_type.model_validate(getattr(entry, "value", None))
        except pydantic.ValidationError as e:
            logger.debug("dropping invalid %s under subkey %.40r: %s", record_type.__name__, subkey, e)
    return records
