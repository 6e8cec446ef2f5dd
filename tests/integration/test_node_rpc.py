"""Forward/Backward/Info against a real node process: exact results and hostile inputs."""

from __future__ import annotations

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import MODEL
from procs import run
from moeswarm.model.expert_client import ExpertClient
from moeswarm.model.experts import expert_backward, expert_forward, init_expert, prepack_weights
from moeswarm.protocol import codec, expert_pb2
from moeswarm.protocol.errors import BadRequest, ExpertNotFound, NodeUnavailable, NotTrainable, Overloaded

D = MODEL["d_model"]


def local_expert(uid: str, seed: int = 7):
    return init_expert(MODEL["d_model"], MODEL["d_ff"], seed=seed, uid=uid)


async def _forward(endpoint: str, inputs: dict, **kwargs) -> dict:
    client = ExpertClient(endpoint)
    try:
        return await client.forward(MODEL["name"], inputs, timeout_s=10, **kwargs)
    finally:
        await client.close()


@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_forward_is_bit_exact_against_local_expert(plain_node, rows):
    node = plain_node
    uids = ["itest.L0.E1", "itest.L1.E3"]  # two experts in one request
    inputs = {uid: torch.randn(rows, D) for uid in uids}
    outputs = run(_forward(node.ready["endpoint"], inputs))
    for uid in uids:
        with torch.no_grad():
            expected = local_expert(uid)(inputs[uid])
        assert outputs[uid].dtype == torch.float32
        assert torch.equal(outputs[uid], expected), f"{uid}: max diff {(outputs[uid] - expected).abs().max()}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")
def test_cuda_node_serves_forward_and_backward_close_to_cpu(node_factory):
    node = node_factory(device="cuda", optimizer=dict(name="sgd", lr=0.05, update_every=1_000_000))
    uid, x, grad_y = "itest.L1.E2", torch.randn(33, D), torch.randn(33, D)
    reference = local_expert(uid)
    x_ref = x.clone().requires_grad_(True)
    expected = reference(x_ref)
    expected.backward(grad_y)

    async def forward_and_backward():
        client = ExpertClient(node.ready["endpoint"])
        try:
            out = await client.forward(MODEL["name"], {uid: x}, timeout_s=30)
            grad_x = await client.backward(MODEL["name"], {uid: x}, {uid: grad_y}, timeout_s=30)
            return out[uid], grad_x[uid]
        finally:
            await client.close()

    out, grad_x = run(forward_and_backward())
    torch.testing.assert_close(out, expected.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_x, x_ref.grad, rtol=1e-4, atol=1e-5)


def test_forward_bf16_wire_is_opt_in_and_close(plain_node):
    node = plain_node
    x = torch.randn(16, D)
    out = run(_forward(node.ready["endpoint"], {"itest.L0.E0": x}, wire_dtype=torch.bfloat16))["itest.L0.E0"]
    with torch.no_grad():
        expected = local_expert("itest.L0.E0")(x.bfloat16().float())
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), expected, atol=0.05, rtol=0.02)


def test_a_result_that_overflows_the_callers_fp16_is_refused_not_sent_as_inf(node_factory):
    node = node_factory(wire_dtypes=["float32", "float16"])
    uid, x = "itest.L0.E0", 1000 * torch.randn(8, D)
    with torch.no_grad():
        assert local_expert(uid)(x.half().float()).abs().max() > torch.finfo(torch.float16).max  # finite in fp32 only
    assert torch.isfinite(run(_forward(node.ready["endpoint"], {uid: x}))[uid]).all()
    with pytest.raises(BadRequest, match="overflowed to inf/NaN in torch.float16"):
        run(_forward(node.ready["endpoint"], {uid: x}, wire_dtype=torch.float16))


def test_backward_grads_match_autograd_and_update_weights(node_factory):
    rows, lr = 10, 0.05
    node = node_factory(optimizer=dict(name="sgd", lr=lr, update_every=rows))
    uid = "itest.L1.E2"
    x, grad_y = torch.randn(rows, D), torch.randn(rows, D)

    reference = local_expert(uid)
    x_ref = x.clone().requires_grad_(True)
    reference(x_ref).backward(grad_y)

    async def backward_then_forward():
        client = ExpertClient(node.ready["endpoint"])
        try:
            grad_x = await client.backward(MODEL["name"], {uid: x}, {uid: grad_y}, timeout_s=10)
            after = await client.forward(MODEL["name"], {uid: x}, timeout_s=10)
            info = await client.info(timeout_s=10)
            return grad_x[uid], after[uid], info
        finally:
            await client.close()

    grad_x, out_after, info = run(backward_then_forward())
    assert torch.allclose(grad_x, x_ref.grad, atol=1e-6, rtol=0), (grad_x - x_ref.grad).abs().max()
    # Parameter grads, checked through their effect: one SGD step on the node == one step here.
    torch.optim.SGD(reference.parameters(), lr=lr).step()
    with torch.no_grad():
        expected_after = reference(x)
    assert torch.allclose(out_after, expected_after, atol=1e-6, rtol=0), (out_after - expected_after).abs().max()
    versions = {state.uid: state.version for state in info.experts}
    assert versions[uid] == 1 and versions["itest.L0.E0"] == 0


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_prepacked_node_equals_a_local_prepacked_expert_before_and_after_a_step(node_factory):
    rows, lr, uid, d_model, d_ff = 16, 0.05, "itest-big.L1.E2", 256, 1024  # at this size the two kernels differ
    model = dict(MODEL, name="itest-big", d_model=d_model, d_ff=d_ff)  # its own name: the swarm has a smaller itest
    node = node_factory(model=model, prepack_weights=True, optimizer=dict(name="sgd", lr=lr, update_every=rows))
    x, grad_y = torch.randn(rows, d_model), torch.randn(rows, d_model)
    reference = init_expert(d_model, d_ff, seed=7, uid=uid)
    assert prepack_weights(reference)

    async def forward_backward_forward():
        client = ExpertClient(node.ready["endpoint"])
        try:
            before = await client.forward(model["name"], {uid: x}, timeout_s=10)
            grad_x = await client.backward(model["name"], {uid: x}, {uid: grad_y}, timeout_s=10)
            after = await client.forward(model["name"], {uid: x}, timeout_s=10)  # packed again after the step
            return before[uid], grad_x[uid], after[uid]
        finally:
            await client.close()

    before, grad_x, after = run(forward_backward_forward())
    assert torch.equal(before, expert_forward(reference, x))
    assert torch.equal(grad_x, expert_backward(reference, x, grad_y))
    torch.optim.SGD(reference.parameters(), lr=lr).step()
    assert torch.equal(after, expert_forward(reference, x))
    with torch.no_grad():  # and the plain kernel's result, to fp32 rounding (the step made outputs large)
        torch.testing.assert_close(after, reference(x), atol=1e-6 * float(after.abs().max()), rtol=1e-5)


def test_overflowing_inputs_and_gradients_are_refused_and_change_nothing(node_factory):
    """A refused backward adds nothing to the accumulated grads: the good rows around it step as if
    it had never come (before, its inf grads made the node drop the step with the good rows' grads)."""
    node = node_factory(optimizer=dict(name="sgd", lr=1.0, update_every=8))
    uid, good = "itest.L1.E1", [(torch.randn(4, D), torch.randn(4, D)) for _ in range(2)]
    huge = torch.full((4, D), 3e38)  # finite, so validation lets it in; the matmuls overflow

    async def attack():
        client = ExpertClient(node.ready["endpoint"])
        try:
            with pytest.raises(BadRequest, match="the forward overflowed to inf/NaN"):
                await client.forward(MODEL["name"], {uid: huge}, timeout_s=10)
            await client.backward(MODEL["name"], {uid: good[0][0]}, {uid: good[0][1]}, timeout_s=10)
            with pytest.raises(BadRequest, match="the backward overflowed to inf/NaN"):
                await client.backward(MODEL["name"], {uid: good[0][0]}, {uid: huge}, timeout_s=10)
            await client.backward(MODEL["name"], {uid: good[1][0]}, {uid: good[1][1]}, timeout_s=10)  # 8 rows: a step
            return (await client.forward(MODEL["name"], {uid: good[0][0]}, timeout_s=10))[uid], await client.info(timeout_s=10)
        finally:
            await client.close()

    after, info = run(attack())
    reference = local_expert(uid)
    for x, g in good:
        reference(x).backward(g)
    torch.optim.SGD(reference.parameters(), lr=1.0).step()
    with torch.no_grad():
        torch.testing.assert_close(after, reference(good[0][0]), atol=1e-5, rtol=1e-5)
    assert {state.uid: state.version for state in info.experts}[uid] == 1
    assert "dropped an optimizer step" not in node.log


@pytest.mark.parametrize("rows", [3, 200])  # on the Stream, and unary (over its size limit)
def test_an_inference_only_node_refuses_gradients_and_keeps_its_weights(node_factory, rows):
    node = node_factory(trainable=False, optimizer=dict(name="sgd", lr=0.5, update_every=1))
    uid, x, g = "itest.L0.E1", torch.randn(rows, D), torch.randn(rows, D)

    async def try_to_train():
        client = ExpertClient(node.ready["endpoint"])
        try:
            await client.forward(MODEL["name"], {uid: x}, timeout_s=10, keep_as="step-1")  # keeps nothing here
            with pytest.raises(NotTrainable, match="PERMISSION_DENIED: this node serves inference only"):
                await client.backward(MODEL["name"], {uid: x}, {uid: g}, timeout_s=10, forward_ids={uid: "step-1"})
            # input grads alone change nothing: served (a retried backward may land here)
            grad_x = (await client.backward(MODEL["name"], {uid: x}, {uid: g}, timeout_s=10, input_grads_only={uid}))[uid]
            assert torch.equal(grad_x, expert_backward(local_expert(uid), x, g))
            return (await client.forward(MODEL["name"], {uid: x}, timeout_s=10))[uid], await client.info(timeout_s=10)
        finally:
            await client.close()

    after, info = run(try_to_train())
    with torch.no_grad():
        assert torch.equal(after, local_expert(uid)(x))
    assert {state.version for state in info.experts} == {0} and info.reused_activation_rows == 0


@pytest.mark.parametrize("rows", [3, 200])  # on the Stream, and unary (over its size limit)
def test_backward_reuses_what_its_training_forward_kept(node_factory, rows):
    node = node_factory(optimizer=dict(name="sgd", lr=0.1, update_every=1_000_000))
    uids = ["itest.L0.E1", "itest.L1.E0"]
    x = {uid: torch.randn(rows, D) for uid in uids}
    g = {uid: torch.randn(rows, D) for uid in uids}

    async def train_step():
        client = ExpertClient(node.ready["endpoint"])
        try:
            out = await client.forward(MODEL["name"], x, timeout_s=10, keep_as="step-1")
            # one expert names its forward, the other does not (the node recomputes that one)
            grad_x = await client.backward(MODEL["name"], x, g, timeout_s=10, forward_ids={uids[0]: "step-1"})
            again = await client.backward(MODEL["name"], x, g, timeout_s=10, forward_ids={uids[0]: "step-1"})  # used up
            return out, grad_x, again, await client.info(timeout_s=10)
        finally:
            await client.close()

    out, grad_x, again, info = run(train_step())
    for uid in uids:
        reference = local_expert(uid)
        x_ref = x[uid].clone().requires_grad_(True)
        y = reference(x_ref)
        y.backward(g[uid])
        assert torch.equal(out[uid], y.detach())
        torch.testing.assert_close(grad_x[uid], x_ref.grad, atol=1e-6, rtol=0)
        assert torch.equal(again[uid], grad_x[uid])
    assert info.reused_activation_rows == rows  # only the first backward of the named expert


def test_info_and_health(node_factory):
    node = node_factory(experts=["itest.L0.E0", "itest.L0.E2"])

    async def query():
        client = ExpertClient(node.ready["endpoint"])
        async with grpc.aio.insecure_channel(node.ready["endpoint"]) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="moeswarm.ExpertService"), timeout=10
            )
        try:
            return await client.info(timeout_s=10), health
        finally:
            await client.close()

    info, health = run(query())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert [state.uid for state in info.experts] == ["itest.L0.E0", "itest.L0.E2"]
    assert (info.model.d_model, info.model.d_ff, info.model.name) == (D, MODEL["d_ff"], "itest")
    assert info.peer_id == node.ready["peer_id"]


def _raw_call(endpoint: str, method: str, payload: bytes, *, max_send: int = 64 << 20):
    """Send raw bytes to a method; returns (status code, details)."""

    async def call():
        options = [("grpc.max_send_message_length", max_send)]
        async with grpc.aio.insecure_channel(endpoint, options=options) as channel:
            stub = channel.unary_unary(f"/moeswarm.ExpertService/{method}")
            try:
                await stub(payload, timeout=10)
            except grpc.aio.AioRpcError as e:
                return e.code(), e.details()
            return grpc.StatusCode.OK, ""

    return run(call())


def _request(
    uid: str, x: torch.Tensor | None = None, *, tensor: expert_pb2.Tensor | None = None, forward_id: str = "",
    keep: bool = False, request_id: str = "t",
) -> bytes:
    tensor = tensor if tensor is not None else codec.encode(x)
    batch = expert_pb2.ExpertBatch(uid=uid, inputs=tensor, forward_id=forward_id)
    return expert_pb2.ExpertRequest(model="itest", request_id=request_id, batches=[batch], keep_activations=keep).SerializeToString()


def test_hostile_inputs_get_clear_statuses_and_node_keeps_serving(node_factory):
    node = node_factory(max_message_bytes=1 << 20, max_rows=512)
    endpoint, uid = node.ready["endpoint"], "itest.L0.E0"
    good = torch.randn(3, D)
    nan = good.clone()
    nan[1, 2] = float("nan")
    wrong_dtype = expert_pb2.Tensor(dtype="int64", shape=[3, D], data=b"\0" * (3 * D * 8))
    short = expert_pb2.Tensor(dtype="float32", shape=[3, D], data=b"\0" * 10)
    cases = {
        "garbage bytes": (b"\xff\xfe garbage \x00\x01" * 50, grpc.StatusCode.INVALID_ARGUMENT, "not a valid"),
        # over wire.SMALL_PAYLOAD_BYTES: parsed by protocol/wire.py instead of protobuf
        "large garbage": (b"\xff\xfe garbage \x00\x01" * 8000, grpc.StatusCode.INVALID_ARGUMENT, "not a valid"),
        "large, truncated": (_request(uid, torch.randn(200, D))[:-5], grpc.StatusCode.INVALID_ARGUMENT, "not a valid"),
        # large and made of tiny fields: refused at a field cap, not parsed field by field for seconds
        "100k unknown fields": (b"\x48\x00" * 100_000, grpc.StatusCode.INVALID_ARGUMENT, "more than"),
        "100k shape entries": (_request(uid, tensor=expert_pb2.Tensor(dtype="float32", shape=[1] * 100_000)),
                               grpc.StatusCode.INVALID_ARGUMENT, "dimensions"),
        "wrong dtype": (_request(uid, tensor=wrong_dtype), grpc.StatusCode.INVALID_ARGUMENT, "int64"),
        "wrong shape": (_request(uid, torch.randn(3, D + 1)), grpc.StatusCode.INVALID_ARGUMENT, "shape"),
        "3-d shape": (_request(uid, torch.randn(2, 3, D)), grpc.StatusCode.INVALID_ARGUMENT, "shape"),
        "short data": (_request(uid, tensor=short), grpc.StatusCode.INVALID_ARGUMENT, "bytes"),
        "nan": (_request(uid, nan), grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
        "unknown uid": (_request("itest.L0.E9", good), grpc.StatusCode.NOT_FOUND, "not hosted"),
        "malformed uid": (_request("../../etc/passwd", good), grpc.StatusCode.INVALID_ARGUMENT, "malformed"),
        "too many rows": (_request(uid, torch.randn(600, D)), grpc.StatusCode.RESOURCE_EXHAUSTED, "split"),
        "over size limit": (_request(uid, torch.randn(2048, D * 4)), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
        "forward naming a forward": (_request(uid, good, forward_id="f"), grpc.StatusCode.INVALID_ARGUMENT, "forward_id"),
        "keep without an id": (_request(uid, good, keep=True, request_id=""), grpc.StatusCode.INVALID_ARGUMENT, "keep_activations"),
        "keep, id too long": (_request(uid, good, keep=True, request_id="x" * 200), grpc.StatusCode.INVALID_ARGUMENT, "keep_activations"),
    }
    for name, (payload, code, words) in cases.items():
        got, details = _raw_call(endpoint, "Forward", payload)
        assert got == code, f"{name}: got {got} ({details})"
        assert words in details, f"{name}: {details!r} does not mention {words!r}"
        # ...and the node still answers a good request, exactly.
        out = run(_forward(endpoint, {uid: good}))[uid]
        with torch.no_grad():
            assert torch.equal(out, local_expert(uid)(good)), name


def test_a_call_over_the_message_or_row_limit_goes_as_several_requests(node_factory):
    node = node_factory(optimizer=dict(name="sgd", lr=0.1, update_every=1_000_000))
    uids = ["itest.L0.E0", "itest.L1.E2"]
    x = {uid: torch.randn(rows, D) for uid, rows in zip(uids, (700, 300))}  # 128 KiB of inputs
    g = {uid: torch.randn_like(t) for uid, t in x.items()}

    async def calls():
        client = ExpertClient(node.ready["endpoint"], max_message_bytes=64 << 10, max_rows=256)
        try:
            return await client.forward(MODEL["name"], x, timeout_s=10), await client.backward(MODEL["name"], x, g, timeout_s=10)
        finally:
            await client.close()

    out, grad_x = run(calls())
    for uid in uids:
        with torch.no_grad():  # (rows sit at other places in other batches: not bit-exact)
            torch.testing.assert_close(out[uid], local_expert(uid)(x[uid]), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grad_x[uid], expert_backward(local_expert(uid), x[uid], g[uid]), atol=1e-6, rtol=1e-5)


def test_client_errors_map_to_our_exceptions(node_factory):
    node = node_factory(max_rows=8)
    endpoint = node.ready["endpoint"]
    with pytest.raises(ExpertNotFound, match="itest.L1.E9"):
        run(_forward(endpoint, {"itest.L1.E9": torch.randn(2, D)}))
    with pytest.raises(BadRequest, match="shape"):
        run(_forward(endpoint, {"itest.L1.E1": torch.randn(2, D - 1)}))
    with pytest.raises(Overloaded, match="split"):
        run(_forward(endpoint, {"itest.L1.E1": torch.randn(9, D)}))


def test_a_call_on_a_closed_client_is_a_node_failure(plain_node):
    """The dispatcher closes a banned replica's client under calls of several requests that are still
    going (Dispatcher._ban): their next request must fail like a node failure (retried elsewhere),
    not with grpc's UsageError (a crash of the whole layer call)."""
    endpoint = plain_node.ready["endpoint"]

    async def on_a_closed_client(stream_busy: bool):
        client = ExpertClient(endpoint)
        await client.forward(MODEL["name"], {"itest.L1.E1": torch.randn(1, D)}, timeout_s=10)
        await client.close()
        client._stream_busy = stream_busy  # busy: the request goes unary, as beside another call
        return await client.forward(MODEL["name"], {"itest.L1.E1": torch.randn(2, D)}, timeout_s=10)

    for stream_busy in (False, True):  # on the stream; unary
        with pytest.raises(NodeUnavailable, match="closed|ended"):
            run(on_a_closed_client(stream_busy))
