"""moeswarm's error hierarchy and the one table that maps it to gRPC status codes.

grpc is imported only by the functions that need it, so the pure-torch model code can raise these
errors without loading the network stack."""

from __future__ import annotations


class MoeSwarmError(Exception):
    """Base of every error moeswarm raises on purpose."""


class ConfigError(MoeSwarmError, ValueError):
    """A config file, CLI flag or model spec is invalid; the message names the key."""


class StartupError(MoeSwarmError):
    """A process of ours could not start (a node exited, a port was taken); the message says where to look."""


class CheckpointError(MoeSwarmError):
    """A node could not write a checkpoint (disk full, state directory read-only or gone); the one
    before it stays. Never sent over the wire."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message  # the same while the cause lasts (a node reports each cause once)


class BadRequest(MoeSwarmError):
    """A request is malformed: wrong dtype, shape, size, non-finite values, bad UID."""


class ExpertNotFound(MoeSwarmError):
    """The node does not host the requested expert."""


class Overloaded(MoeSwarmError):
    """The request is over a size limit or the node's queue is full; retry smaller or elsewhere."""


class TooSlow(MoeSwarmError):
    """The caller did not take what a node streams to it in time (ExportState); read as it arrives."""


class NodeUnavailable(MoeSwarmError):
    """A node did not answer in time, or is shutting down."""


class NotTrainable(MoeSwarmError):
    """The node serves inference only (config trainable: false) and refuses gradients."""


class AllReplicasFailed(MoeSwarmError):
    """Every replica of an expert failed; `attempts` lists (endpoint, reason) pairs."""

    def __init__(self, uid: str, attempts: list[tuple[str, str]]):
        self.uid, self.attempts = uid, attempts
        tried = "; ".join(f"{endpoint}: {reason}" for endpoint, reason in attempts) or (
            "no replica known: no node announces it in the DHT now; `moeswarm status` lists what the swarm serves"
        )
        super().__init__(f"all replicas of expert {uid} failed ({tried})")


# The single error <-> status table (grpc.StatusCode names). Anything not listed is a bug: INTERNAL.
STATUS_OF_ERROR: dict[type[MoeSwarmError], str] = {
    BadRequest: "INVALID_ARGUMENT",
    ConfigError: "INVALID_ARGUMENT",
    ExpertNotFound: "NOT_FOUND",
    Overloaded: "RESOURCE_EXHAUSTED",
    NotTrainable: "PERMISSION_DENIED",
    NodeUnavailable: "UNAVAILABLE",
    TooSlow: "DEADLINE_EXCEEDED",
    AllReplicasFailed: "UNAVAILABLE",
}
ERROR_OF_STATUS: dict[str, type[MoeSwarmError]] = {
    "INVALID_ARGUMENT": BadRequest,
    "NOT_FOUND": ExpertNotFound,
    "RESOURCE_EXHAUSTED": Overloaded,
    "PERMISSION_DENIED": NotTrainable,
    "UNAVAILABLE": NodeUnavailable,
    "DEADLINE_EXCEEDED": NodeUnavailable,
}


def status_of(error: MoeSwarmError):
    """The grpc.StatusCode a node answers `error` with."""
    import grpc

    for cls in type(error).__mro__:
        if cls in STATUS_OF_ERROR:
            return grpc.StatusCode[STATUS_OF_ERROR[cls]]
    return grpc.StatusCode.INTERNAL


def error_from_rpc(error, endpoint: str) -> MoeSwarmError:
    """Turn a failed call (grpc.RpcError) into our error type, keeping the node's message and naming the endpoint."""
    return _error_of(error.code().name, error.details(), endpoint)


def error_from_status(code: int, message: str, endpoint: str) -> MoeSwarmError:
    """The same for an error answered inside a Stream response (code: a grpc.StatusCode number)."""
    import grpc

    name = next((status.name for status in grpc.StatusCode if status.value[0] == code), f"STATUS_{code}")
    return _error_of(name, message, endpoint)


def _error_of(name: str, details: str, endpoint: str) -> MoeSwarmError:
    cls = ERROR_OF_STATUS.get(name, MoeSwarmError)
    return cls(f"{endpoint}: {name}: {details}")
