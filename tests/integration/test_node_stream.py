"""The Stream method: many requests on one call, errors answered in-stream, shutdown with idle streams."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest
import torch

from conftest import MODEL
from procs import run
from test_node_rpc import _request, local_expert
from moeswarm.model.expert_client import ExpertClient
from moeswarm.protocol import codec, expert_pb2
from moeswarm.protocol.errors import BadRequest, ExpertNotFound, NodeUnavailable, Overloaded

D = MODEL["d_model"]
UID = "itest.L0.E0"
OTHER_UID = "itest.L0.E1"


def _good(x: torch.Tensor, request_id: str, *, backward_grads: torch.Tensor | None = None) -> bytes:
    request = expert_pb2.ExpertRequest(model="itest", request_id=request_id, backward=backward_grads is not None)
    batch = request.batches.add(uid=UID)
    codec.encode_into(batch.inputs, x)
    if backward_grads is not None:
        codec.encode_into(batch.grad_outputs, backward_grads)
    return request.SerializeToString()


async def _exchange_all(endpoint: str, payloads: list[bytes]) -> list[expert_pb2.ExpertResponse]:
    """Send each payload on one Stream call, reading its answer before sending the next."""
    async with grpc.aio.insecure_channel(endpoint) as channel:
        call = channel.stream_stream(
            "/moeswarm.ExpertService/Stream", response_deserializer=expert_pb2.ExpertResponse.FromString
        )()
        answers = []
        for payload in payloads:
            await call.write(payload)
            answers.append(await call.read())
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
        return answers


def test_stream_answers_hostile_requests_in_order_and_keeps_going(node_factory):
    node = node_factory(max_rows=512)
    good = torch.randn(3, D)
    nan = good.clone()
    nan[0, 0] = float("inf")
    cases = {
        "garbage bytes": (b"\xff\xfe garbage \x00\x01" * 50, grpc.StatusCode.INVALID_ARGUMENT, "not a valid"),
        "wrong shape": (_request(UID, torch.randn(3, D + 1)), grpc.StatusCode.INVALID_ARGUMENT, "shape"),
        "nan": (_request(UID, nan), grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
        "unknown uid": (_request("itest.L0.E9", good), grpc.StatusCode.NOT_FOUND, "not hosted"),
        "too many rows": (_request(UID, torch.randn(600, D)), grpc.StatusCode.RESOURCE_EXHAUSTED, "split"),
    }
    payloads = []
    for name, (payload, _, _) in cases.items():
        payloads += [payload, _good(good, f"after {name}")]
    answers = run(_exchange_all(node.ready["endpoint"], payloads))
    with torch.no_grad():
        expected = local_expert(UID)(good)
    for i, (name, (_, code, words)) in enumerate(cases.items()):
        bad, after = answers[2 * i], answers[2 * i + 1]
        assert bad.error_code == code.value[0], f"{name}: got code {bad.error_code} ({bad.error_message})"
        assert words in bad.error_message, f"{name}: {bad.error_message!r} does not mention {words!r}"
        assert not bad.tensors
        assert after.error_code == 0 and after.request_id == f"after {name}"
        assert torch.equal(codec.decode(after.tensors[0]), expected), name


def test_stream_backward_matches_autograd(node_factory):
    node = node_factory(optimizer=dict(name="sgd", lr=0.1, update_every=1_000_000))
    x, grad_y = torch.randn(5, D), torch.randn(5, D)
    (answer,) = run(_exchange_all(node.ready["endpoint"], [_good(x, "g", backward_grads=grad_y)]))
    x_ref = x.clone().requires_grad_(True)
    local_expert(UID)(x_ref).backward(grad_y)
    assert answer.error_code == 0
    assert torch.allclose(codec.decode(answer.tensors[0]), x_ref.grad, atol=1e-6, rtol=0)


def test_unary_call_refuses_the_stream_only_backward_field(plain_node):
    node = plain_node

    async def call():
        async with grpc.aio.insecure_channel(node.ready["endpoint"]) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                payload = _good(torch.randn(1, D), "u", backward_grads=torch.randn(1, D))
                await channel.unary_unary("/moeswarm.ExpertService/Forward")(payload, timeout=10)
            return raised.value

    error = run(call())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "call Backward" in error.details()


def test_client_uses_the_stream_when_free_and_unary_when_busy(node_factory):
    node = node_factory(max_rows=4096)
    small, large = torch.randn(2, D), torch.randn(4096, D)  # 512 KiB: large requests ride the stream too

    async def calls():
        client = ExpertClient(node.ready["endpoint"])
        try:
            out_large = await client.forward("itest", {UID: large}, timeout_s=10)
            stream = client._stream
            out_small = await client.forward("itest", {UID: small}, timeout_s=10)
            same_stream = client._stream is stream
            # An error answered in-stream raises our error and keeps the stream open.
            with pytest.raises(ExpertNotFound, match="itest.L0.E9"):
                await client.forward("itest", {"itest.L0.E9": small}, timeout_s=10)
            with pytest.raises(BadRequest, match="shape"):
                await client.forward("itest", {UID: torch.randn(2, D + 1)}, timeout_s=10)
            # Two at once: the second finds the stream busy and goes unary (the stream stays open). Other
            # experts: rows of one expert that arrive together are merged into one matmul, whose last
            # bits may differ from a matmul of the small request's rows alone.
            unary_calls, unary = [], client._forward
            client._forward = lambda *args, **kwargs: unary_calls.append(args) or unary(*args, **kwargs)
            together = await asyncio.gather(*(client.forward("itest", {uid: x}, timeout_s=10) for uid, x in ((UID, large), (OTHER_UID, small))))
            again = await client.forward("itest", {UID: small}, timeout_s=10)
            assert len(unary_calls) == 1
            return out_large[UID], out_small[UID], [together[0][UID], together[1][OTHER_UID]], again[UID], stream, same_stream, client._stream
        finally:
            await client.close()

    out_large, out_small, together, again, stream, same_stream, stream_after = run(calls())
    expert = local_expert(UID)
    with torch.no_grad():
        assert torch.equal(out_large, expert(large)) and torch.equal(out_small, expert(small))
        assert torch.equal(together[0], out_large) and torch.equal(together[1], local_expert(OTHER_UID)(small))
        assert torch.equal(again, out_small)
    assert stream is not None and same_stream and stream_after is stream


def test_a_request_over_the_nodes_size_limit_fails_alone_and_the_next_opens_a_fresh_stream(node_factory):
    """The node's transport refuses a message over its limit by ending the stream: that request gets
    the status a unary call gets (RESOURCE_EXHAUSTED: Overloaded), and the next one is served."""
    node = node_factory(max_message_bytes=1 << 20)
    small, too_large = torch.randn(2, D), torch.randn(8192, D)  # 1 MiB of payload, plus framing

    async def calls():
        client = ExpertClient(node.ready["endpoint"])  # its own limit (64 MiB) does not split it
        try:
            before = await client.forward("itest", {UID: small}, timeout_s=10)
            stream = client._stream
            with pytest.raises(Overloaded, match="RESOURCE_EXHAUSTED"):
                await client.forward("itest", {UID: too_large}, timeout_s=10)
            after = await client.forward("itest", {UID: small}, timeout_s=10)
            return before[UID], after[UID], stream, client._stream
        finally:
            await client.close()

    before, after, stream, stream_after = run(calls())
    assert "Traceback" not in node.log and " ERROR " not in node.log  # a client's mistake, not the node's
    assert torch.equal(before, after)
    assert stream is not None and stream_after is not None and stream_after is not stream


def test_a_stopped_node_times_out_on_the_stream_and_a_fresh_stream_serves_after_resume(node_factory):
    node = node_factory()
    x = torch.randn(1, D)

    async def calls():
        client = ExpertClient(node.ready["endpoint"])
        try:
            before = await client.forward("itest", {UID: x}, timeout_s=10)
            os.kill(node.popen.pid, signal.SIGSTOP)
            try:
                with pytest.raises(NodeUnavailable, match="DEADLINE_EXCEEDED"):
                    await client.forward("itest", {UID: x}, timeout_s=0.5)
                dropped = client._stream is None
            finally:
                os.kill(node.popen.pid, signal.SIGCONT)
            after = await client.forward("itest", {UID: x}, timeout_s=10)
            return before[UID], after[UID], dropped
        finally:
            await client.close()

    before, after, dropped = run(calls())
    assert dropped and torch.equal(before, after)


def test_sigterm_with_an_idle_stream_open_stops_within_5s(node_factory):
    node = node_factory()

    async def hold_stream_then_terminate():
        client = ExpertClient(node.ready["endpoint"])
        try:
            await client.forward("itest", {UID: torch.randn(1, D)}, timeout_s=10)
            assert client._stream is not None
            started = time.monotonic()
            os.kill(node.popen.pid, signal.SIGTERM)
            while node.popen.poll() is None and time.monotonic() - started < 10:
                await asyncio.sleep(0.05)
            elapsed = time.monotonic() - started
            # The client is told: its next call fails (to be retried elsewhere), it does not hang.
            with pytest.raises(NodeUnavailable):
                await client.forward("itest", {UID: torch.randn(1, D)}, timeout_s=2)
            return elapsed
        finally:
            await client.close()

    elapsed = run(hold_stream_then_terminate())
    assert node.popen.returncode == 0
    assert elapsed < 5.0


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_busy_polling_node_spins_after_answers_then_sleeps_and_stops_on_sigterm(node_factory):
    node = node_factory(busy_poll_us=600_000)  # 0.6 s of polling after each answer
    x = torch.randn(1, D)

    def cpu_over(seconds: float) -> float:
        before = _cpu_seconds(node.popen.pid)
        time.sleep(seconds)
        return _cpu_seconds(node.popen.pid) - before

    async def calls():
        client = ExpertClient(node.ready["endpoint"])
        try:
            first = await client.forward("itest", {UID: x}, timeout_s=10)
            polling = cpu_over(0.3)  # inside the window: the node's loop keeps running
            time.sleep(0.6)
            idle = cpu_over(0.3)  # past it: the node sleeps as any node does
            again = await client.forward("itest", {UID: x}, timeout_s=10)
            os.kill(node.popen.pid, signal.SIGTERM)  # while it polls again
            started = time.monotonic()
            while node.popen.poll() is None and time.monotonic() - started < 10:
                await asyncio.sleep(0.05)
            return first[UID], again[UID], polling, idle, time.monotonic() - started
        finally:
            await client.close()

    first, again, polling, idle, stop_s = run(calls())
    with torch.no_grad():
        assert torch.equal(first, local_expert(UID)(x)) and torch.equal(again, first)
    # CPU time, not speed: a polling loop takes a good part of a core, a sleeping one next to none.
    assert polling > 0.06, f"the node used {polling:.3f} s of CPU in 0.3 s after an answer: it did not poll"
    assert idle < 0.05, f"the node used {idle:.3f} s of CPU in 0.3 s, 0.9 s after its last answer: it kept polling"
    assert node.popen.returncode == 0 and stop_s < 5.0
