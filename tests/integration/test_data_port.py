"""The node's data port (protocol/framing.py): exact results, hostile connections, fallback to gRPC,
shutdown with idle connections; against real node processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time

import grpc
import pytest
import torch

from conftest import MODEL
from procs import run
from test_node_rpc import _request, local_expert
from moeswarm.model.expert_client import ExpertClient
from moeswarm.protocol import expert_pb2
from moeswarm.protocol.errors import BadRequest, ExpertNotFound
from moeswarm.protocol.framing import LENGTH, PREFACE

D = MODEL["d_model"]
UID = "itest.L0.E1"


def _data_client(node) -> ExpertClient:
    return ExpertClient(node.ready["endpoint"], data_endpoint=node.ready["data_endpoint"])


@pytest.mark.parametrize("rows", [1, 300, 1024])  # 1024 rows: a frame over framing.SMALL_FRAME, read in place
def test_forward_and_backward_over_the_data_port_are_exact(plain_node, rows):
    x, grad_y = torch.randn(rows, D), torch.randn(rows, D)
    reference = local_expert(UID)
    x_ref = x.clone().requires_grad_(True)
    expected = reference(x_ref)
    expected.backward(grad_y)

    async def calls():
        client = _data_client(plain_node)
        try:
            out = await client.forward(MODEL["name"], {UID: x, "itest.L1.E3": x[:3]}, timeout_s=10)
            grad_x = await client.backward(MODEL["name"], {UID: x}, {UID: grad_y}, timeout_s=10, input_grads_only={UID})
            used_data_port = client._data is not None and client._stream is None
            return out, grad_x[UID], used_data_port
        finally:
            await client.close()

    out, grad_x, used_data_port = run(calls())
    assert used_data_port, "the calls went over gRPC, not the data port"
    assert torch.equal(out[UID], expected.detach())
    with torch.no_grad():
        assert torch.equal(out["itest.L1.E3"], local_expert("itest.L1.E3")(x[:3]))
    torch.testing.assert_close(grad_x, x_ref.grad, rtol=0, atol=1e-6)


def test_errors_come_back_as_ours_and_the_connection_stays_usable(plain_node):
    async def calls():
        client = _data_client(plain_node)
        try:
            with pytest.raises(BadRequest, match="shape"):
                await client.forward(MODEL["name"], {UID: torch.randn(2, D + 1)}, timeout_s=10)
            with pytest.raises(ExpertNotFound):
                await client.forward(MODEL["name"], {"itest.L0.E9": torch.randn(2, D)}, timeout_s=10)
            connection = client._data
            out = await client.forward(MODEL["name"], {UID: torch.ones(1, D)}, timeout_s=10)
            return connection is client._data is not None, out[UID]
        finally:
            await client.close()

    same_connection, out = run(calls())
    assert same_connection, "an error answer dropped the data connection"
    with torch.no_grad():
        assert torch.equal(out, local_expert(UID)(torch.ones(1, D)))


def _connect(node) -> socket.socket:
    host, port = node.ready["data_endpoint"].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _read_frame(sock: socket.socket) -> bytes | None:
    """One frame, or None when the node closed the connection first."""
    data = b""
    while len(data) < LENGTH.size or len(data) < LENGTH.size + LENGTH.unpack_from(data)[0]:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return None
        data += chunk
    (size,) = LENGTH.unpack_from(data)
    assert len(data) == LENGTH.size + size, "the node answered more than one frame"
    return data[LENGTH.size :]


def _closed_by_node(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _frame(message: bytes) -> bytes:
    return LENGTH.pack(len(message)) + message


def test_hostile_connections_get_a_status_and_the_node_serves_on(plain_node):
    good = _request(UID, torch.randn(2, D))
    # not our preface: answered INVALID_ARGUMENT, then closed
    with _connect(plain_node) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        answer = expert_pb2.ExpertResponse.FromString(_read_frame(sock))
        assert answer.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "preface" in answer.error_message
        assert _closed_by_node(sock)
    # a frame claiming more than max_message_bytes: RESOURCE_EXHAUSTED before any of it is read, then closed
    with _connect(plain_node) as sock:
        sock.sendall(PREFACE + LENGTH.pack(2**32 - 1))
        answer = expert_pb2.ExpertResponse.FromString(_read_frame(sock))
        assert answer.error_code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "limit" in answer.error_message
        assert _closed_by_node(sock)
    # garbage inside a frame: INVALID_ARGUMENT in the answer, and the same connection serves the next request
    with _connect(plain_node) as sock:
        sock.sendall(PREFACE + _frame(b"\xff\xfe garbage" * 30))
        answer = expert_pb2.ExpertResponse.FromString(_read_frame(sock))
        assert answer.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "not a valid" in answer.error_message
        sock.sendall(_frame(good))
        answer = expert_pb2.ExpertResponse.FromString(_read_frame(sock))
        assert answer.error_code == 0 and len(answer.tensors) == 1
    # a connection that dies halfway through a frame, and many that open and say nothing
    with _connect(plain_node) as sock:
        sock.sendall(PREFACE + _frame(good)[:-7])
    idle = [_connect(plain_node) for _ in range(20)]
    try:
        out = run(_data_client_forward(plain_node, torch.randn(3, D)))
        assert out.shape == (3, D)
    finally:
        for sock in idle:
            sock.close()


async def _data_client_forward(node, x: torch.Tensor) -> torch.Tensor:
    client = _data_client(node)
    try:
        return (await client.forward(MODEL["name"], {UID: x}, timeout_s=10))[UID]
    finally:
        await client.close()


def test_a_data_port_that_cannot_be_reached_falls_back_to_grpc(plain_node):
    with socket.socket() as unused:  # a port nobody listens on
        unused.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{unused.getsockname()[1]}"

    async def calls():
        client = ExpertClient(plain_node.ready["endpoint"], data_endpoint=closed)
        try:
            first = await client.forward(MODEL["name"], {UID: torch.ones(1, D)}, timeout_s=10)
            second = await client.forward(MODEL["name"], {UID: torch.ones(1, D)}, timeout_s=10)
            return first[UID], second[UID], client.data_endpoint, client._stream is not None
        finally:
            await client.close()

    first, second, data_endpoint, on_stream = run(calls())
    assert torch.equal(first, second)
    assert data_endpoint is None and on_stream, "the client kept trying the unreachable data port"


def test_node_without_a_data_port_and_shutdown_with_idle_data_connections(node_factory):
    off = node_factory(data_port=None)
    assert off.ready["data_endpoint"] is None
    node = node_factory()

    async def open_idle_connection():
        client = _data_client(node)
        await client.forward(MODEL["name"], {UID: torch.ones(1, D)}, timeout_s=10)
        return client  # left open and idle

    loop = asyncio.new_event_loop()
    try:
        client = loop.run_until_complete(open_idle_connection())
        started = time.monotonic()
        node.popen.send_signal(signal.SIGTERM)
        code = node.popen.wait(timeout=20)
        took = time.monotonic() - started
        loop.run_until_complete(client.close())
    finally:
        loop.close()
    assert code == 0
    assert took < 5.0, f"an idle data connection held the node's shutdown for {took:.1f} s"


def test_remote_moe_finds_the_data_port_in_the_dht_and_calls_over_it(node_factory, dht_peer):
    """The node's records announce its data port; the dispatcher's clients use it (not gRPC), and the
    layer's output equals the local experts'. (A swarm of its own: the nodes other tests killed keep
    records in the default one until they expire.)"""
    from moeswarm.model.remote_moe import RemoteMoE

    node = node_factory(swarm="dataport")
    endpoint = node.ready["endpoint"]
    with RemoteMoE(model=MODEL["name"], layer=0, d_model=D, n_experts=MODEL["n_experts"], k=2,
                   initial_peers=dht_peer.ready["maddrs"], swarm="dataport") as moe:
        x = torch.randn(5, D)
        with torch.no_grad():
            out = moe(x)
        records = [r for uid in moe.uids for r in moe.client.directory.replicas(uid)]
        client = moe.client.dispatcher.clients.clients[endpoint]
        assert records and all(r.endpoint == endpoint and r.data_endpoint == node.ready["data_endpoint"] for r in records)
        assert client.data_endpoint == node.ready["data_endpoint"] and client._data is not None and client._stream is None
        expected = _local_output(moe, x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def _local_output(moe, x: torch.Tensor) -> torch.Tensor:
    """What moe(x) should have returned, from its last routing and the local experts."""
    routing, expected = moe.last_routing, torch.zeros_like(x)
    with torch.no_grad():
        for t in range(x.shape[0]):
            for slot in range(routing.topk_ids_TK.shape[1]):
                uid = moe.uids[int(routing.topk_ids_TK[t, slot])]
                expected[t] += routing.weights_TK[t, slot] * local_expert(uid)(x[t : t + 1])[0]
    return expected


def test_inference_calls_go_out_and_come_back_on_the_callers_thread(node_factory, dht_peer, monkeypatch):
    """Dispatcher.forward_blocking: once the node's client exists, an inference call is sent and
    answered by the calling thread over a blocking data connection; the event loop does not run."""
    from moeswarm.model.remote_moe import RemoteMoE

    node = node_factory(swarm="blocking")
    with RemoteMoE(model=MODEL["name"], layer=0, d_model=D, n_experts=MODEL["n_experts"], k=2,
                   initial_peers=dht_peer.ready["maddrs"], swarm="blocking") as moe:
        with torch.no_grad():
            moe(torch.randn(1, D))  # the first call makes the node's client, on the loop
        loop_runs = []
        loop = moe.client.dispatcher._runner.loop
        monkeypatch.setattr(loop, "run_until_complete", lambda *a: loop_runs.append(a) or pytest.fail("the loop ran"))
        for rows in (1, 1, 3, 17):
            x = torch.randn(rows, D)
            with torch.no_grad():
                out = moe(x)
            torch.testing.assert_close(out, _local_output(moe, x), rtol=0, atol=1e-5)
        assert loop_runs == []
        assert moe.client.dispatcher.clients.existing(node.ready["endpoint"])._blocking is not None
        monkeypatch.undo()


def test_ctrl_c_during_a_blocking_call_leaves_the_next_answers_paired_with_their_requests(node_factory, dht_peer):
    """A Ctrl-C while the caller waits for a stopped node: the answer that node sends once resumed
    must not be taken for the next request's (each call has new inputs, so a mix-up shows)."""
    from moeswarm.model.remote_moe import RemoteMoE

    node = node_factory(swarm="ctrlc")
    with RemoteMoE(model=MODEL["name"], layer=0, d_model=D, n_experts=MODEL["n_experts"], k=2,
                   initial_peers=dht_peer.ready["maddrs"], swarm="ctrlc") as moe:
        with torch.no_grad():
            moe(torch.randn(1, D))
            os.kill(node.popen.pid, signal.SIGSTOP)
            previous = signal.signal(signal.SIGINT, signal.default_int_handler)
            try:
                threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
                with pytest.raises(KeyboardInterrupt):
                    moe(torch.randn(1, D))
            finally:
                signal.signal(signal.SIGINT, previous)
                os.kill(node.popen.pid, signal.SIGCONT)
            time.sleep(0.2)  # the resumed node answers the interrupted request
            for _ in range(3):
                x = torch.randn(1, D)
                torch.testing.assert_close(moe(x), _local_output(moe, x), rtol=0, atol=1e-5)


def test_a_stopped_node_fails_a_blocking_call_at_its_deadline_and_serves_again_after(node_factory, dht_peer):
    """forward_blocking with one replica: no hedge, so the calling thread waits for the call's deadline
    (not longer), the error names it, and once the node is back (its ban over) calls are exact again."""
    from moeswarm.model.dispatcher import DispatchConfig
    from moeswarm.model.remote_moe import RemoteMoE
    from moeswarm.protocol.errors import AllReplicasFailed

    node = node_factory(swarm="deadline")
    with RemoteMoE(model=MODEL["name"], layer=0, d_model=D, n_experts=MODEL["n_experts"], k=2,
                   initial_peers=dht_peer.ready["maddrs"], swarm="deadline", config=DispatchConfig(timeout_s=1.0)) as moe:
        with torch.no_grad():
            moe(torch.randn(1, D))  # the node's client exists: the next call is a blocking one
            os.kill(node.popen.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(AllReplicasFailed, match="DEADLINE_EXCEEDED"):
                    moe(torch.randn(1, D))
                took = time.monotonic() - started
            finally:
                os.kill(node.popen.pid, signal.SIGCONT)
            assert 1.0 <= took < 4.0, took  # the deadline, not the dispatcher's bound of a call (4 s: timeout x (attempts + 1))
            deadline = time.monotonic() + 10
            while True:  # banned for 1 s, then tried again
                x = torch.randn(1, D)
                try:
                    out = moe(x)
                    break
                except AllReplicasFailed:
                    assert time.monotonic() < deadline, "the node was never used again"
                    time.sleep(0.2)
            torch.testing.assert_close(out, _local_output(moe, x), rtol=0, atol=1e-5)
            x = torch.randn(1, D)
            torch.testing.assert_close(moe(x), _local_output(moe, x), rtol=0, atol=1e-5)
