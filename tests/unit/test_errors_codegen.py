"""protocol/errors.py (error <-> gRPC status table) and the generated protobuf modules' freshness."""

import pathlib

import grpc
import pytest

from moeswarm.protocol import codegen
from moeswarm.protocol.errors import (
    AllReplicasFailed,
    BadRequest,
    ConfigError,
    ExpertNotFound,
    MoeSwarmError,
    NodeUnavailable,
    NotTrainable,
    Overloaded,
    StartupError,
    TooSlow,
    error_from_rpc,
    status_of,
)

PROTOCOL_DIR = pathlib.Path(codegen.__file__).resolve().parent


@pytest.mark.parametrize(
    "error,code",
    [
        (BadRequest("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (ConfigError("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (ExpertNotFound("x"), grpc.StatusCode.NOT_FOUND),
        (Overloaded("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (NotTrainable("x"), grpc.StatusCode.PERMISSION_DENIED),
        (NodeUnavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (TooSlow("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (AllReplicasFailed("m.L0.E0", []), grpc.StatusCode.UNAVAILABLE),
        (StartupError("x"), grpc.StatusCode.INTERNAL),
        (MoeSwarmError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_of_maps_each_error_class(error, code):
    assert status_of(error) is code


def test_status_of_follows_subclasses():
    class TooManyRows(Overloaded):
        pass

    assert status_of(TooManyRows("x")) is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_all_replicas_failed_names_uid_and_every_endpoint():
    attempts = [("10.0.0.1:5000", "UNAVAILABLE: connection refused"), ("10.0.0.2:5001", "deadline exceeded")]
    error = AllReplicasFailed("tiny.L1.E2", attempts)
    message = str(error)
    assert "tiny.L1.E2" in message
    for endpoint, reason in attempts:
        assert endpoint in message and reason in message
    assert error.uid == "tiny.L1.E2" and error.attempts == attempts
    assert "no replica known" in str(AllReplicasFailed("tiny.L0.E0", []))


def test_config_error_is_a_value_error():
    # Callers that validate with `except ValueError` also catch config errors.
    assert issubclass(ConfigError, ValueError)


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize(
    "code,cls",
    [
        (grpc.StatusCode.INVALID_ARGUMENT, BadRequest),
        (grpc.StatusCode.NOT_FOUND, ExpertNotFound),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, Overloaded),
        (grpc.StatusCode.PERMISSION_DENIED, NotTrainable),
        (grpc.StatusCode.UNAVAILABLE, NodeUnavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, NodeUnavailable),
        (grpc.StatusCode.INTERNAL, MoeSwarmError),
    ],
)
def test_error_from_rpc_keeps_code_details_and_endpoint(code, cls):
    error = error_from_rpc(_FakeRpcError(code, "rows over limit"), "127.0.0.1:4242")
    assert type(error) is cls
    assert "127.0.0.1:4242" in str(error) and code.name in str(error) and "rows over limit" in str(error)


def test_generated_protobuf_modules_match_expert_proto(tmp_path):
    codegen.generate(tmp_path)
    for name in codegen.GENERATED:
        fresh = (tmp_path / name).read_bytes()
        committed = (PROTOCOL_DIR / name).read_bytes()
        assert fresh == committed, (
            f"protocol/{name} is stale: it differs from what protocol/expert.proto generates. "
            "Run `python protocol/codegen.py` and commit the result (with the grpcio-tools version "
            "the generated header names)."
        )
