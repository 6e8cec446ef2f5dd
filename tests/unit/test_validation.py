"""node/validation.py: each malformed Forward/Backward request raises the right error, naming the problem."""

import pytest
import torch

from moeswarm.node.validation import Limits, all_finite, validate_request
from moeswarm.protocol import codec, expert_pb2
from moeswarm.protocol.errors import BadRequest, ExpertNotFound, Overloaded
from moeswarm.protocol.spec import ModelSpec

SPEC = ModelSpec(name="tiny", d_model=4, d_ff=8, n_layers=2, n_experts=4)
HOSTED = ("tiny.L0.E0", "tiny.L0.E1", "tiny.L1.E2")
LIMITS = Limits(SPEC, frozenset(HOSTED), max_rows=8, wire_dtypes=frozenset({"float32", "bfloat16"}))


def _rows(n: int, seed: int = 0, d: int = 4) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _batch(uid: str, x_ND: torch.Tensor, g_ND: torch.Tensor | None = None) -> expert_pb2.ExpertBatch:
    batch = expert_pb2.ExpertBatch(uid=uid, inputs=codec.encode(x_ND))
    if g_ND is not None:
        batch.grad_outputs.CopyFrom(codec.encode(g_ND))
    return batch


def _request(*batches, model: str = "tiny") -> expert_pb2.ExpertRequest:
    return expert_pb2.ExpertRequest(model=model, request_id="r1", batches=list(batches))


def _rejects(request, error, message, *, backward=False):
    with pytest.raises(error) as info:
        validate_request(request, LIMITS, backward=backward)
    assert type(info.value) is error
    assert message in str(info.value)


def test_good_forward_request_decodes_every_batch_in_order():
    x0, x1 = _rows(3, seed=1), _rows(8, seed=2)  # max_rows rows are still fine
    work = validate_request(_request(_batch("tiny.L1.E2", x0), _batch("tiny.L0.E0", x1)), LIMITS, backward=False)
    assert [item.uid for item in work] == ["tiny.L1.E2", "tiny.L0.E0"]
    assert torch.equal(work[0].x_ND, x0) and torch.equal(work[1].x_ND, x1)
    assert work[0].g_ND is None and work[1].g_ND is None


def test_good_backward_request_carries_grads():
    x_ND, g_ND = _rows(2, seed=3), _rows(2, seed=4)
    (item,) = validate_request(_request(_batch("tiny.L0.E1", x_ND, g_ND)), LIMITS, backward=True)
    assert torch.equal(item.x_ND, x_ND) and torch.equal(item.g_ND, g_ND)


def test_input_grads_only_is_read_for_backward_and_refused_on_a_forward():
    x_ND, g_ND = _rows(2, seed=3), _rows(2, seed=4)
    batch = _batch("tiny.L0.E1", x_ND, g_ND)
    batch.input_grads_only = True
    (item,) = validate_request(_request(batch), LIMITS, backward=True)
    assert item.input_grads_only
    forward = _batch("tiny.L0.E1", x_ND)
    forward.input_grads_only = True
    _rejects(_request(forward), BadRequest, "tiny.L0.E1: input_grads_only is for Backward batches")


def test_bfloat16_batch_is_accepted_when_allowed():
    x_ND = _rows(2, seed=5).to(torch.bfloat16)
    (item,) = validate_request(_request(_batch("tiny.L0.E0", x_ND)), LIMITS, backward=False)
    assert item.x_ND.dtype == torch.bfloat16 and torch.equal(item.x_ND, x_ND)


def test_empty_batch_is_accepted():
    (item,) = validate_request(_request(_batch("tiny.L0.E0", _rows(0))), LIMITS, backward=False)
    assert item.x_ND.shape == (0, 4)


def test_wrong_model():
    _rejects(_request(_batch("tiny.L0.E0", _rows(1)), model="huge"), BadRequest, "request is for model 'huge'")


def test_no_batches():
    _rejects(_request(), BadRequest, "no expert batches")


def test_more_batches_than_hosted_experts():
    batches = [_batch(uid, _rows(1)) for uid in HOSTED] + [_batch("tiny.L1.E3", _rows(1))]
    _rejects(_request(*batches), BadRequest, "carries 4 batches")


def test_duplicate_uid():
    _rejects(_request(_batch("tiny.L0.E0", _rows(1)), _batch("tiny.L0.E0", _rows(2))), BadRequest, "appears twice")


@pytest.mark.parametrize("uid", ["tiny.L1.E3", "tiny.L9.E9", "other.L0.E0"])
def test_well_formed_uid_not_hosted_is_not_found(uid):
    _rejects(_request(_batch(uid, _rows(1))), ExpertNotFound, f"expert {uid!r} is not hosted")


@pytest.mark.parametrize("uid", ["", "tiny.L0", "tiny/L0/E0", "x" * 500])
def test_malformed_uid_is_bad_request(uid):
    _rejects(_request(_batch(uid, _rows(1))), BadRequest, "malformed expert uid")


def test_wrong_last_dimension():
    _rejects(_request(_batch("tiny.L0.E0", _rows(2, d=5))), BadRequest, "must have shape [rows, 4], got [2, 5]")


def test_three_dimensional_inputs():
    batch = expert_pb2.ExpertBatch(uid="tiny.L0.E0", inputs=codec.encode(torch.zeros(2, 3, 4)))
    _rejects(_request(batch), BadRequest, "got [2, 3, 4]")


def test_missing_inputs():
    _rejects(_request(expert_pb2.ExpertBatch(uid="tiny.L0.E0")), BadRequest, "inputs must have shape")


def test_rows_over_max_rows_is_overloaded():
    _rejects(_request(_batch("tiny.L0.E0", _rows(9))), Overloaded, "9 rows is over this node's limit of 8")


def test_dtype_not_accepted():
    batch = _batch("tiny.L0.E0", _rows(2).to(torch.float16))
    _rejects(_request(batch), BadRequest, "dtype 'float16' not accepted")


def test_byte_count_mismatch():
    batch = _batch("tiny.L0.E0", _rows(2))
    batch.inputs.data = batch.inputs.data[:-4]
    _rejects(_request(batch), BadRequest, "needs 32 bytes, got 28")


def test_negative_rows():
    batch = expert_pb2.ExpertBatch(uid="tiny.L0.E0", inputs=expert_pb2.Tensor(dtype="float32", shape=[-1, 4]))
    _rejects(_request(batch), BadRequest, "negative dimension")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs(bad):
    x_ND = _rows(3)
    x_ND[1, 2] = bad
    _rejects(_request(_batch("tiny.L0.E0", x_ND)), BadRequest, "inputs contains NaN or infinite values")


def test_non_finite_grads():
    g_ND = _rows(2, seed=6)
    g_ND[0, 0] = float("nan")
    _rejects(_request(_batch("tiny.L0.E0", _rows(2), g_ND)), BadRequest, "grad_outputs contains NaN", backward=True)


def test_backward_without_grad_outputs():
    _rejects(_request(_batch("tiny.L0.E0", _rows(2))), BadRequest, "has no grad_outputs", backward=True)


def test_backward_grad_rows_mismatch():
    _rejects(_request(_batch("tiny.L0.E0", _rows(2), _rows(3))), BadRequest, "grad_outputs [3, 4]", backward=True)


def test_backward_grad_shape_checked_like_inputs():
    request = _request(_batch("tiny.L0.E0", _rows(2), _rows(2, d=3)))
    _rejects(request, BadRequest, "grad_outputs must have shape", backward=True)


def test_backward_grad_dtype_mismatch():
    batch = _batch("tiny.L0.E0", _rows(2), _rows(2).to(torch.bfloat16))
    _rejects(_request(batch), BadRequest, "must match inputs", backward=True)


def test_forward_carrying_grad_outputs():
    _rejects(_request(_batch("tiny.L0.E0", _rows(2), _rows(2))), BadRequest, "must not carry grad_outputs")


def test_second_bad_batch_fails_the_whole_request():
    good, bad = _batch("tiny.L0.E0", _rows(1)), _batch("tiny.L0.E1", _rows(1, d=2))
    _rejects(_request(good, bad), BadRequest, "tiny.L0.E1")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_one_bad_entry_anywhere(dtype, bad):
    """Every position of a [7, 37] tensor (odd sizes: SIMD tails), and of a 1 MiB one (BLAS paths)."""
    for rows, cols in ((7, 37), (1024, 256)):
        x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)).to(dtype)
        assert all_finite(x)
        positions = range(x.numel()) if x.numel() < 1000 else (0, 1, 17, x.numel() // 2, x.numel() - 1)
        for position in positions:
            y = x.clone()
            y.view(-1)[position] = bad
            assert not all_finite(y), (rows, cols, position)


@pytest.mark.filterwarnings("ignore:overflow encountered in dot:RuntimeWarning")  # pytest shows it; nodes filter it
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_finite_accepts_huge_finite_entries(dtype):
    """x.x overflows for these (the fast check cannot tell): the exact check says they are finite."""
    big = torch.finfo(dtype).max / 2
    x = torch.full((3, 5), big, dtype=dtype)
    assert all_finite(x)
    x[1, 2] = float("nan")
    assert not all_finite(x)


def test_all_finite_on_a_non_contiguous_tensor():
    x = torch.randn(6, 8).t()
    assert all_finite(x)
    x[3, 1] = float("inf")
    assert not all_finite(x)
