"""model/router.py: top-k gate (weights, ids, dtype, gradients) and its auxiliary losses.

Legend: T tokens, D model dim, E experts, K experts per token.
"""

import math

import pytest
import torch
from torch.nn import functional as F

from moeswarm.model.router import Router, RouterOutput, load_balancing_loss, router_z_loss

T, D, E = 16, 8, 4


def _x_TD(seed: int = 0, t: int = T) -> torch.Tensor:
    return torch.randn(t, D, generator=torch.Generator().manual_seed(seed))


def _router(k: int, *, renormalize: bool = True, seed: int = 0) -> Router:
    torch.manual_seed(seed)
    return Router(D, E, k, renormalize=renormalize)


# ---------------------------------------------------------------- Router


@pytest.mark.parametrize("k", [1, 2, E])
def test_output_shapes_and_dtypes(k):
    out = _router(k)(_x_TD())
    assert isinstance(out, RouterOutput)
    assert out.topk_ids_TK.shape == (T, k) and out.topk_ids_TK.dtype == torch.long
    assert out.weights_TK.shape == (T, k) and out.weights_TK.dtype == torch.float32
    assert out.logits_TE.shape == (T, E)
    assert bool(((out.topk_ids_TK >= 0) & (out.topk_ids_TK < E)).all())


@pytest.mark.parametrize("k", [1, 2, 3])
def test_renormalized_weights_sum_to_one_per_token(k):
    out = _router(k)(_x_TD())
    torch.testing.assert_close(out.weights_TK.sum(dim=-1), torch.ones(T), rtol=0, atol=1e-6)
    assert bool((out.weights_TK > 0).all())


@pytest.mark.parametrize("k", [1, 2])
def test_chosen_experts_are_distinct_and_sorted_by_weight(k):
    out = _router(k)(_x_TD())
    for ids in out.topk_ids_TK.tolist():
        assert len(set(ids)) == k
    assert bool((out.weights_TK[:, :-1] >= out.weights_TK[:, 1:]).all())


def test_without_renormalize_weights_are_the_softmax_probs_of_the_chosen_experts():
    out = _router(2, renormalize=False)(_x_TD())
    probs_TE = torch.softmax(out.logits_TE.double(), dim=-1)
    expected_TK = probs_TE.gather(1, out.topk_ids_TK).float()
    torch.testing.assert_close(out.weights_TK, expected_TK, rtol=0, atol=1e-6)
    assert bool((out.weights_TK.sum(dim=-1) < 1).all())  # two of four experts never hold all the mass


def test_renormalize_divides_the_raw_probs_by_their_sum():
    raw = _router(2, renormalize=False)(_x_TD())
    norm = _router(2, renormalize=True)(_x_TD())  # same seed: same gate
    assert torch.equal(raw.topk_ids_TK, norm.topk_ids_TK)
    torch.testing.assert_close(norm.weights_TK, raw.weights_TK / raw.weights_TK.sum(-1, keepdim=True))


def test_top1_ids_are_the_argmax_of_the_logits_and_weight_is_one():
    out = _router(1)(_x_TD())
    assert torch.equal(out.topk_ids_TK[:, 0], out.logits_TE.argmax(dim=-1))
    assert torch.equal(out.weights_TK, torch.ones(T, 1))


def test_logits_are_the_gate_applied_to_x():
    router = _router(2)
    x_TD = _x_TD()
    torch.testing.assert_close(router(x_TD).logits_TE, x_TD @ router.gate.weight.T)
    assert router.gate.bias is None


def test_topk_picks_the_largest_logits_of_a_hand_built_gate():
    router = _router(2)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(E, D))  # logit e = x[e]
    x_TD = torch.zeros(2, D)
    x_TD[0, :E] = torch.tensor([0.0, 3.0, 1.0, 2.0])
    x_TD[1, :E] = torch.tensor([5.0, -1.0, 4.0, 0.0])
    out = router(x_TD)
    assert out.topk_ids_TK.tolist() == [[1, 3], [0, 2]]
    # renormalised over the two chosen: softmax of their logits alone
    torch.testing.assert_close(out.weights_TK[0], torch.softmax(torch.tensor([3.0, 2.0]), 0))
    torch.testing.assert_close(out.weights_TK[1], torch.softmax(torch.tensor([5.0, 4.0]), 0))


def test_low_precision_inputs_get_fp32_softmax_weights():
    router = _router(2).to(torch.bfloat16)
    out = router(_x_TD().to(torch.bfloat16))
    assert out.logits_TE.dtype == torch.bfloat16
    assert out.weights_TK.dtype == torch.float32
    expected = torch.softmax(out.logits_TE.float(), -1).gather(1, out.topk_ids_TK)
    torch.testing.assert_close(out.weights_TK, expected / expected.sum(-1, keepdim=True))


@pytest.mark.parametrize("k", [0, -1, E + 1])
def test_k_out_of_range_raises_value_error(k):
    with pytest.raises(ValueError, match=f"k={k}"):
        Router(D, E, k)


@pytest.mark.parametrize("renormalize", [True, False])
def test_gradients_reach_the_gate_through_the_weights(renormalize):
    router = _router(2, renormalize=renormalize)
    x_TD = _x_TD()
    coef_TK = torch.randn(T, 2, generator=torch.Generator().manual_seed(9))
    (router(x_TD).weights_TK * coef_TK).sum().backward()
    grad = router.gate.weight.grad
    assert grad is not None and grad.shape == (E, D)
    assert bool(torch.isfinite(grad).all()) and grad.abs().sum() > 0

    # the same loss written by hand, on a copy of the gate
    w_ED = router.gate.weight.detach().clone().requires_grad_(True)
    probs_TE = torch.softmax(x_TD @ w_ED.T, dim=-1)
    ids_TK = router(x_TD).topk_ids_TK
    weights_TK = probs_TE.gather(1, ids_TK)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
    (weights_TK * coef_TK).sum().backward()
    torch.testing.assert_close(grad, w_ED.grad, rtol=1e-5, atol=1e-6)


def test_ids_carry_no_gradient():
    out = _router(2)(_x_TD())
    assert out.weights_TK.requires_grad
    assert not out.topk_ids_TK.requires_grad


# ---------------------------------------------------------------- load_balancing_loss


@pytest.mark.parametrize("k", [1, 2])
def test_load_balancing_loss_is_one_for_perfectly_uniform_routing(k):
    logits_TE = torch.zeros(8, E)  # P_e = 1/E for every expert
    # every expert gets exactly 8*k/E slots: f_e = 1/E
    topk_ids_TK = torch.stack([(torch.arange(8) + j) % E for j in range(k)], dim=1)
    assert torch.bincount(topk_ids_TK.reshape(-1), minlength=E).tolist() == [8 * k // E] * E
    loss = load_balancing_loss(logits_TE, topk_ids_TK)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, torch.tensor(1.0))


def test_load_balancing_loss_collapsed_routing_equals_E_times_P_of_the_chosen_expert():
    logits_TE = torch.randn(10, E, generator=torch.Generator().manual_seed(1))
    logits_TE[:, 2] += 3.0  # expert 2 wins everywhere
    topk_ids_TK = torch.full((10, 1), 2, dtype=torch.long)
    p_2 = torch.softmax(logits_TE, -1)[:, 2].mean()
    torch.testing.assert_close(load_balancing_loss(logits_TE, topk_ids_TK), E * p_2)
    assert load_balancing_loss(logits_TE, topk_ids_TK) > 1.0


def test_load_balancing_loss_matches_a_hand_computation():
    logits_TE = torch.randn(6, E, generator=torch.Generator().manual_seed(2))
    topk_ids_TK = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0], [1, 0], [2, 0]])
    probs_TE = torch.softmax(logits_TE.double(), -1)
    expected = 0.0
    for e in range(E):
        f_e = (topk_ids_TK == e).sum().item() / topk_ids_TK.numel()
        expected += f_e * probs_TE[:, e].mean().item()
    assert load_balancing_loss(logits_TE, topk_ids_TK).item() == pytest.approx(E * expected, rel=1e-6)


def test_load_balancing_loss_has_gradient_to_logits():
    logits_TE = torch.randn(6, E, generator=torch.Generator().manual_seed(3), requires_grad=True)
    topk_ids_TK = logits_TE.detach().topk(2, dim=-1).indices
    load_balancing_loss(logits_TE, topk_ids_TK).backward()
    assert logits_TE.grad is not None and logits_TE.grad.abs().sum() > 0


# ---------------------------------------------------------------- router_z_loss


def test_z_loss_matches_a_hand_computation():
    logits_TE = torch.tensor([[0.0, 1.0, 2.0], [-1.0, 0.5, 3.0]])
    per_token = [math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits_TE.tolist()]
    assert router_z_loss(logits_TE).item() == pytest.approx(sum(per_token) / 2, rel=1e-6)


def test_z_loss_of_zero_logits_is_log_E_squared():
    assert router_z_loss(torch.zeros(5, E)).item() == pytest.approx(math.log(E) ** 2, rel=1e-6)


def test_z_loss_is_fp32_for_bf16_logits_and_differentiable():
    logits_TE = torch.randn(4, E, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    logits_TE.requires_grad_(True)
    loss = router_z_loss(logits_TE)
    assert loss.dtype == torch.float32
    loss.backward()
    # d/dx mean(lse^2) = 2 * lse * softmax / T
    lse_T = torch.logsumexp(logits_TE.detach().float(), -1, keepdim=True)
    expected = 2 * lse_T * F.softmax(logits_TE.detach().float(), -1) / 4
    torch.testing.assert_close(logits_TE.grad.float(), expected, rtol=1e-2, atol=1e-2)
