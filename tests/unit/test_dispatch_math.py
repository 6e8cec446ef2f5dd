"""The pure math around a dispatch: group_rows, combine, check_min_experts, DispatchConfig
validation, and the LocalMoE reference that RemoteMoE must equal.

Legend: T tokens, D model dim, E experts, K experts per token.
"""

import logging

import pytest
import torch

from moeswarm.model.dispatcher import DispatchConfig, DispatchResult, Dispatcher
from moeswarm.model.expert_rows import gather_rows, group_rows, scatter_outputs
from moeswarm.model.replicas import AFFINITY_MAX_EXPERTS, AFFINITY_MAX_ROWS, pick_endpoint
from moeswarm.model.expert_client import split_rows
from moeswarm.model.experts import init_expert
from moeswarm.model.local_moe import LocalMoE, combine
from moeswarm.model.remote_moe import RemoteMoE, check_min_experts
from moeswarm.protocol.errors import AllReplicasFailed, ConfigError
from moeswarm.protocol.records import ExpertRecord

D = 8
UIDS = [f"tiny.L0.E{e}" for e in range(4)]


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- group_rows


def test_group_rows_covers_every_token_slot_exactly_once_with_the_right_uid():
    topk_ids_TK = torch.tensor([[0, 2], [2, 1], [3, 0], [0, 2], [1, 3]])
    rows = group_rows(topk_ids_TK, UIDS)
    seen = []
    for uid, r in rows.items():
        assert r.token_idx.shape == r.slot_idx.shape
        assert r.token_idx.dtype == r.slot_idx.dtype == torch.long
        for t, k in zip(r.token_idx.tolist(), r.slot_idx.tolist()):
            assert UIDS[int(topk_ids_TK[t, k])] == uid
            seen.append((t, k))
    assert sorted(seen) == [(t, k) for t in range(5) for k in range(2)]


@pytest.mark.parametrize("tokens", [1, 4, 32, 33, 200])  # both sides of the small-batch path (64 slots)
def test_group_rows_small_and_large_paths_agree_and_skip_unsent_slots(tokens):
    generator = torch.Generator().manual_seed(tokens)
    topk_ids_TK = torch.randint(-1, len(UIDS), (tokens, 2), generator=generator)  # -1: slot not sent
    by_loop = {}
    for t, row in enumerate(topk_ids_TK.tolist()):
        for k, e in enumerate(row):
            if e >= 0:
                by_loop.setdefault(UIDS[e], []).append((t, k))
    rows = group_rows(topk_ids_TK, UIDS)
    assert list(rows) == sorted(by_loop, key=UIDS.index)  # experts in id order
    assert {uid: list(zip(r.token_idx.tolist(), r.slot_idx.tolist())) for uid, r in rows.items()} == by_loop
    assert all(r.token_idx.dtype == r.slot_idx.dtype == r.flat_idx.dtype == torch.long for r in rows.values())
    assert all(torch.equal(r.flat_idx, r.token_idx * 2 + r.slot_idx) for r in rows.values())


def test_group_rows_lists_only_the_experts_that_got_rows():
    topk_ids_TK = torch.tensor([[3], [1], [3]])
    rows = group_rows(topk_ids_TK, UIDS)
    assert set(rows) == {UIDS[1], UIDS[3]}
    assert rows[UIDS[3]].token_idx.tolist() == [0, 2]
    assert rows[UIDS[3]].slot_idx.tolist() == [0, 0]
    assert rows[UIDS[1]].token_idx.tolist() == [1]


def test_group_rows_random_routing_partitions_all_pairs():
    topk_ids_TK = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(t))[:2] for t in range(50)])
    rows = group_rows(topk_ids_TK, UIDS)
    assert sum(r.token_idx.numel() for r in rows.values()) == topk_ids_TK.numel()
    pairs = {(t, k) for r in rows.values() for t, k in zip(r.token_idx.tolist(), r.slot_idx.tolist())}
    assert len(pairs) == topk_ids_TK.numel()
    rebuilt_TK = torch.full_like(topk_ids_TK, -1)
    for uid, r in rows.items():
        rebuilt_TK[r.token_idx, r.slot_idx] = UIDS.index(uid)
    assert torch.equal(rebuilt_TK, topk_ids_TK)


@pytest.mark.parametrize("tokens", [1, 5, 40])  # decoding, small path, sorted path
def test_gather_and_scatter_put_every_row_back_in_its_place(tokens):
    """gather_rows then scatter_outputs is the identity on sent slots: each expert's output row i
    lands at (token_idx[i], slot_idx[i]); unsent slots (-1) and unanswered experts stay 0 / unserved."""
    generator = torch.Generator().manual_seed(tokens)
    topk_ids_TK = torch.randint(-1, len(UIDS), (tokens, 2), generator=generator)
    topk_ids_TK[0] = torch.tensor([0, 1])  # at least two experts answer
    x_TD = _randn(tokens, D, seed=tokens)
    rows = group_rows(topk_ids_TK, UIDS)
    inputs = gather_rows(x_TD, rows)
    for uid, r in rows.items():
        assert torch.equal(inputs[uid], x_TD[r.token_idx])
    twice = group_rows(torch.tensor([[2, 2]]), UIDS)  # no gate does this; the rows must still match
    assert gather_rows(x_TD[:1], twice)[UIDS[2]].shape == (2, D)
    outputs = {uid: x_ND * (UIDS.index(uid) + 1) for uid, x_ND in inputs.items()}  # expert e scales by e+1
    y_TKD, served_TK = scatter_outputs(topk_ids_TK, D, rows, outputs)
    expected_TKD = x_TD[:, None, :] * (topk_ids_TK + 1).clamp(min=0)[..., None].float()
    assert torch.equal(y_TKD, expected_TKD) and torch.equal(served_TK, topk_ids_TK >= 0)
    missing = UIDS[1]  # every replica of one expert failed
    partial = {uid: y for uid, y in outputs.items() if uid != missing}
    y_TKD, served_TK = scatter_outputs(topk_ids_TK, D, rows, partial)
    lost_TK = topk_ids_TK == 1
    assert torch.equal(served_TK, (topk_ids_TK >= 0) & ~lost_TK)
    assert torch.equal(y_TKD, expected_TKD * served_TK[..., None])
    y_TKD, served_TK = scatter_outputs(topk_ids_TK, D, rows, {})
    assert not served_TK.any() and not y_TKD.any()


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("wire_dtype", [torch.float32, torch.bfloat16])
def test_one_token_rows_and_outputs_land_in_their_slots(k, wire_dtype):
    """Decoding one sequence takes a path of its own (shared index tensors, one cat): the same
    rows and the same fp32 outputs as for any other call, in a tensor of its own."""
    topk_ids_TK = torch.randperm(len(UIDS), generator=torch.Generator().manual_seed(k))[:k][None]
    rows = group_rows(topk_ids_TK, UIDS)
    assert list(rows) == sorted((UIDS[e] for e in topk_ids_TK[0].tolist()), key=UIDS.index)
    for slot, expert in enumerate(topk_ids_TK[0].tolist()):
        r = rows[UIDS[expert]]
        assert (r.token_idx.tolist(), r.slot_idx.tolist(), r.flat_idx.tolist()) == ([0], [slot], [slot])
    x_TD = _randn(1, D, seed=k)
    outputs = {uid: (x_ND * (UIDS.index(uid) + 1)).to(wire_dtype) for uid, x_ND in gather_rows(x_TD, rows).items()}
    y_TKD, served_TK = scatter_outputs(topk_ids_TK, D, rows, outputs)
    expected_TKD = torch.stack([outputs[UIDS[e]][0].float() for e in topk_ids_TK[0].tolist()])[None]
    assert y_TKD.dtype == torch.float32 and torch.equal(y_TKD, expected_TKD) and served_TK.tolist() == [[True] * k]
    y_TKD.zero_()  # the caller's own tensor: the answers (and the shared index tensors) stay as they were
    assert torch.equal(torch.stack([outputs[UIDS[e]][0].float() for e in topk_ids_TK[0].tolist()])[None], expected_TKD)
    assert group_rows(topk_ids_TK, UIDS)[UIDS[topk_ids_TK[0, 0]]].slot_idx.tolist() == [0]


def test_backward_of_a_layer_call_that_sent_no_slot_is_all_zeros():
    """Every slot dropped (a capacity limit): no RPC goes out and the input grads are zeros."""
    dispatcher = Dispatcher(directory=None, model="tiny", config=DispatchConfig())
    try:
        topk_ids_TK = torch.full((3, 2), -1)
        x_TD = _randn(3, D)
        rows = group_rows(topk_ids_TK, UIDS)
        y_TKD, served_TK = scatter_outputs(topk_ids_TK, D, rows, {})
        result = DispatchResult(y_TKD, served_TK, rows, endpoints={}, attempts={})
        grad_x_TD = dispatcher.run(dispatcher.backward(result, x_TD, torch.ones(3, 2, D)))
    finally:
        dispatcher.close()
    assert rows == {} and torch.equal(grad_x_TD, torch.zeros(3, D))


def test_group_rows_of_no_tokens_is_empty():
    assert group_rows(torch.zeros(0, 2, dtype=torch.long), UIDS) == {}


# ---------------------------------------------------------------- DispatchConfig


def test_dispatch_config_defaults_are_valid():
    config = DispatchConfig()
    assert config.timeout_s > 0 and config.max_attempts >= 1 and config.hedge_floor_s >= 0
    DispatchConfig(wire_dtype="bfloat16", hedge_floor_s=0.0, max_attempts=1)


@pytest.mark.parametrize(
    "bad",
    [
        {"timeout_s": 0},
        {"timeout_s": -1.0},
        {"max_attempts": 0},
        {"max_attempts": -2},
        {"hedge_floor_s": -0.01},
        {"wire_dtype": "int8"},
        {"wire_dtype": "fp32"},
    ],
)
def test_dispatch_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError):
        DispatchConfig(**bad)


def test_dispatch_config_error_names_the_bad_wire_dtype_and_the_choices():
    with pytest.raises(ConfigError, match="'int8'.*bfloat16"):
        DispatchConfig(wire_dtype="int8")


def test_dispatch_config_rejects_nan_timeout():
    # `nan <= 0` is False, so NaN slips past the check; Dispatcher.run then waits
    # future.result(nan), which times out at once: every layer call fails with a bare TimeoutError.
    with pytest.raises(ConfigError):
        DispatchConfig(timeout_s=float("nan"))


def test_dispatch_config_is_frozen_and_keyword_only():
    config = DispatchConfig()
    with pytest.raises(AttributeError):
        config.timeout_s = 1.0
    with pytest.raises(TypeError):
        DispatchConfig(1.0)


@pytest.mark.parametrize("min_experts", [0, -1, 3])
def test_remote_moe_rejects_min_experts_outside_1_to_k(min_experts):
    # validated before any client is touched: the sentinel client is never used
    with pytest.raises(ValueError, match=f"min_experts={min_experts}"):
        RemoteMoE(model="tiny", layer=0, d_model=D, n_experts=4, k=2, client=object(), min_experts=min_experts)


# ---------------------------------------------------------------- combine


def test_combine_all_served_is_the_weighted_sum():
    y_TKD, weights_TK = _randn(5, 2, D, seed=1), torch.softmax(_randn(5, 2, seed=2), -1)
    out_TD = combine(y_TKD, weights_TK, torch.ones(5, 2, dtype=torch.bool))
    assert out_TD.shape == (5, D) and out_TD.dtype == torch.float32
    torch.testing.assert_close(out_TD, torch.einsum("tk,tkd->td", weights_TK, y_TKD))
    torch.testing.assert_close(out_TD[3], weights_TK[3, 0] * y_TKD[3, 0] + weights_TK[3, 1] * y_TKD[3, 1])


def test_combine_all_served_keeps_unnormalised_weights():
    y_TKD = torch.ones(1, 2, D)
    out_TD = combine(y_TKD, torch.tensor([[0.3, 0.2]]), torch.ones(1, 2, dtype=torch.bool))
    torch.testing.assert_close(out_TD, torch.full((1, D), 0.5))


def test_combine_token_with_one_slot_dropped_gets_exactly_the_other_expert():
    y_TKD, weights_TK = _randn(3, 2, D, seed=3), torch.softmax(_randn(3, 2, seed=4), -1)
    served_TK = torch.ones(3, 2, dtype=torch.bool)
    served_TK[1, 0] = False
    served_TK[2, 1] = False
    out_TD = combine(y_TKD, weights_TK, served_TK)
    torch.testing.assert_close(out_TD[1], y_TKD[1, 1])
    torch.testing.assert_close(out_TD[2], y_TKD[2, 0])
    torch.testing.assert_close(out_TD[0], weights_TK[0] @ y_TKD[0])  # untouched token


def test_combine_renormalises_the_remaining_weights_of_three():
    y_TKD = _randn(1, 3, D, seed=5)
    weights_TK = torch.tensor([[0.5, 0.3, 0.2]])
    served_TK = torch.tensor([[True, False, True]])
    expected = (0.5 * y_TKD[0, 0] + 0.2 * y_TKD[0, 2]) / 0.7
    torch.testing.assert_close(combine(y_TKD, weights_TK, served_TK)[0], expected)


def test_combine_token_with_every_slot_dropped_is_zero_not_nan():
    y_TKD = torch.zeros(2, 2, D)
    y_TKD[0] = _randn(2, D, seed=6)
    served_TK = torch.tensor([[True, True], [False, False]])
    out_TD = combine(y_TKD, torch.full((2, 2), 0.5), served_TK)
    assert bool(torch.isfinite(out_TD).all())
    assert torch.equal(out_TD[1], torch.zeros(D))


def test_combine_computes_in_fp32_from_low_precision_inputs():
    y_TKD = _randn(4, 2, D, seed=7).to(torch.bfloat16)
    weights_TK = torch.softmax(_randn(4, 2, seed=8), -1).to(torch.bfloat16)
    out_TD = combine(y_TKD, weights_TK, torch.ones(4, 2, dtype=torch.bool))
    assert out_TD.dtype == torch.float32
    torch.testing.assert_close(out_TD, torch.einsum("tk,tkd->td", weights_TK.float(), y_TKD.float()))


def test_combine_rescales_surviving_weights_to_the_original_total():
    y_TKD = _randn(1, 2, D, seed=9)
    weights_TK = torch.tensor([[0.3, 0.2]], requires_grad=True)  # unnormalised router (sum 0.5)
    out_TD = combine(y_TKD, weights_TK, torch.tensor([[True, False]]))
    torch.testing.assert_close(out_TD[0], 0.5 * y_TKD[0, 0])  # the output keeps its scale
    out_TD.sum().backward()
    # output = (w0 + w1) * y0: both weights get d/dw = sum(y0)
    expected = y_TKD[0, 0].sum().expand(1, 2)
    torch.testing.assert_close(weights_TK.grad, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- LocalMoE


def _moe(k: int, n_experts: int = 4, seed: int = 0) -> LocalMoE:
    torch.manual_seed(123)  # router init
    return LocalMoE(model="tiny", layer=3, d_model=D, d_ff=16, n_experts=n_experts, k=k, seed=seed)


def _hand_loop(moe: LocalMoE, x_TD: torch.Tensor) -> torch.Tensor:
    routing = moe.router(x_TD)
    out = torch.zeros_like(x_TD)
    with torch.no_grad():
        for t in range(x_TD.shape[0]):
            for k in range(routing.topk_ids_TK.shape[1]):
                expert = moe.experts[int(routing.topk_ids_TK[t, k])]
                out[t] += routing.weights_TK[t, k] * expert(x_TD[t : t + 1])[0]
    return out


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("t", [1, 7])
def test_local_moe_equals_a_hand_loop_over_tokens(k, t):
    moe = _moe(k)
    x_TD = _randn(t, D, seed=10 + t)
    with torch.no_grad():
        out_TD = moe(x_TD)
    assert out_TD.shape == (t, D) and out_TD.dtype == torch.float32
    torch.testing.assert_close(out_TD, _hand_loop(moe, x_TD), rtol=0, atol=1e-6)


def test_local_moe_uses_more_than_one_expert_for_this_input():
    # guards the loop test above from passing with a degenerate router
    moe = _moe(2)
    assert len(torch.unique(moe.router(_randn(7, D, seed=17)).topk_ids_TK)) > 1


def test_local_moe_handles_3d_inputs_like_their_flattened_tokens():
    moe = _moe(2)
    x_BSD = _randn(2, 3, D, seed=20)
    with torch.no_grad():
        out_BSD = moe(x_BSD)
        flat_TD = moe(x_BSD.reshape(-1, D))
    assert out_BSD.shape == (2, 3, D)
    torch.testing.assert_close(out_BSD.reshape(-1, D), flat_TD, rtol=0, atol=0)
    torch.testing.assert_close(flat_TD, _hand_loop(moe, x_BSD.reshape(-1, D)), rtol=0, atol=1e-6)


def test_local_moe_batch_of_one_3d():
    moe = _moe(1)
    x = _randn(1, 1, D, seed=21)
    with torch.no_grad():
        out = moe(x)
    assert out.shape == (1, 1, D)
    torch.testing.assert_close(out[0], _hand_loop(moe, x[0]), rtol=0, atol=1e-6)


def test_local_moe_experts_equal_what_nodes_host():
    moe = _moe(2, seed=5)
    assert moe.uids == [f"tiny.L3.E{e}" for e in range(4)]
    for e, expert in enumerate(moe.experts):
        reference = init_expert(D, 16, seed=5, uid=f"tiny.L3.E{e}")
        theirs, ours = dict(reference.named_parameters()), dict(expert.named_parameters())
        assert theirs.keys() == ours.keys()
        for name in theirs:
            assert torch.equal(theirs[name], ours[name]), (e, name)
    # different experts, different weights
    assert not torch.equal(moe.experts[0].w1.weight, moe.experts[1].w1.weight)


def test_local_moe_gradients_reach_router_experts_and_input():
    moe = _moe(2)
    x_TD = _randn(6, D, seed=22).requires_grad_(True)
    moe(x_TD).square().sum().backward()
    assert x_TD.grad is not None and x_TD.grad.abs().sum() > 0
    assert moe.router.gate.weight.grad.abs().sum() > 0
    used = torch.unique(moe.router(x_TD.detach()).topk_ids_TK).tolist()
    for e, expert in enumerate(moe.experts):
        got_grad = expert.w1.weight.grad is not None and expert.w1.weight.grad.abs().sum() > 0
        assert got_grad == (e in used), e


# ---------------------------------------------------------------- check_min_experts


def _result(served_TK: torch.Tensor, attempts: dict | None = None) -> DispatchResult:
    T, K = served_TK.shape
    return DispatchResult(
        y_TKD=torch.zeros(T, K, D),
        served_TK=served_TK,
        rows={},
        endpoints={},
        attempts=attempts if attempts is not None else {},
    )


TOPK_TK = torch.tensor([[0, 1], [2, 3], [1, 2]])
FAILED = [("127.0.0.1:1", "UNAVAILABLE: x")]


def test_check_min_experts_passes_when_everything_was_served():
    check_min_experts(_result(torch.ones(3, 2, dtype=torch.bool)), TOPK_TK, UIDS, min_experts=2)


def test_check_min_experts_allows_dropping_down_to_min_experts():
    served_TK = torch.tensor([[True, False], [False, True], [True, True]])
    check_min_experts(_result(served_TK), TOPK_TK, UIDS, min_experts=1)


def test_check_min_experts_names_the_missing_slot_and_lists_attempts():
    served_TK = torch.tensor([[True, True], [True, False], [True, True]])  # token 1 lost expert 3
    attempts = {UIDS[3]: FAILED, UIDS[0]: [("127.0.0.1:9", "other")]}
    with pytest.raises(AllReplicasFailed) as info:
        check_min_experts(_result(served_TK, attempts), TOPK_TK, UIDS, min_experts=2)
    assert info.value.uid == UIDS[3]
    assert info.value.attempts == FAILED
    assert UIDS[3] in str(info.value) and "127.0.0.1:1: UNAVAILABLE: x" in str(info.value)
    assert "127.0.0.1:9" not in str(info.value)


def test_check_min_experts_token_with_nothing_served_fails_even_at_min_one():
    served_TK = torch.tensor([[True, True], [True, True], [False, False]])
    with pytest.raises(AllReplicasFailed) as info:
        check_min_experts(_result(served_TK, {UIDS[1]: FAILED}), TOPK_TK, UIDS, min_experts=1)
    assert info.value.uid == UIDS[1]  # token 2, slot 0 -> expert 1
    assert info.value.attempts == FAILED


def test_check_min_experts_caps_min_experts_at_k():
    check_min_experts(_result(torch.ones(3, 2, dtype=torch.bool)), TOPK_TK, UIDS, min_experts=5)
    served_TK = torch.tensor([[True, True], [True, True], [False, True]])
    with pytest.raises(AllReplicasFailed) as info:
        check_min_experts(_result(served_TK, {UIDS[1]: FAILED}), TOPK_TK, UIDS, min_experts=5)
    assert info.value.uid == UIDS[1]


def test_check_min_experts_without_recorded_attempts_says_no_replica_known():
    served_TK = torch.tensor([[True, True], [False, True], [True, True]])
    with pytest.raises(AllReplicasFailed, match="no replica known") as info:
        check_min_experts(_result(served_TK), TOPK_TK, UIDS, min_experts=2)
    assert info.value.uid == UIDS[2] and info.value.attempts == []


# ---------------------------------------------------------------- pick_endpoint


def test_pick_endpoint_prefers_the_forward_replica_then_a_node_already_called_then_the_best():
    banned = {"c"}
    is_banned = banned.__contains__
    assert pick_endpoint(["a", "b"], is_banned, preferred="b") == "b"  # backward follows the forward
    assert pick_endpoint(["a", "b"], is_banned, preferred="c") == "a"  # unless that replica is banned
    assert pick_endpoint(["a", "b"], is_banned, planned={"b": ["E0"]}) == "b"  # join the RPC already planned
    assert pick_endpoint(["a", "c"], is_banned, planned={"c": ["E0"]}) == "a"  # never join a banned node
    assert pick_endpoint(["a", "b"], is_banned) == "a"
    assert pick_endpoint(["c"], is_banned) == "c"  # banned replicas stay a last resort
    assert pick_endpoint([], is_banned) is None


def test_pick_endpoint_spreads_a_batch_of_small_experts_over_replicas_about_as_fast():
    never_banned = lambda endpoint: False  # noqa: E731
    latency = {"a": 0.001, "b": 0.0015, "slow": 0.05}.__getitem__
    full = ["E%d" % i for i in range(AFFINITY_MAX_EXPERTS)]
    # decoding one token: its experts share one RPC
    assert pick_endpoint(["a", "b"], never_banned, planned={"b": full[:-1]}, latency_s=latency) == "b"
    # a node already called has all the experts it takes: a replica as fast gets its own RPC
    assert pick_endpoint(["a", "b"], never_banned, planned={"b": full}, latency_s=latency) == "a"
    # ... but not a much slower one: the expert joins after all (the least loaded node called)
    assert pick_endpoint(["slow", "a"], never_banned, planned={"a": full}, latency_s=latency) == "a"
    assert pick_endpoint(["a", "b"], never_banned, planned={"a": full + ["E9"], "b": full}, latency_s=latency) == "b"
    # a replica never measured counts as fast (latency_s 0), so it gets tried
    assert pick_endpoint(["new", "a"], never_banned, planned={"a": full}, latency_s={"new": 0.0, "a": 0.001}.__getitem__) == "new"


def test_a_layer_call_of_many_small_experts_goes_to_every_replicated_node_and_one_token_to_one():
    class EveryExpertOnTwoNodes:  # what ExpertDirectory.replicas answers (no lookup needed here)
        def replicas(self, uid):
            return [ExpertRecord(f"peer-{n}", f"127.0.0.1:{5000 + n}", 0, 0.0, version=0) for n in range(2)]

    dispatcher = Dispatcher(directory=EveryExpertOnTwoNodes(), model="m", config=DispatchConfig())
    try:
        uids = [f"m.L0.E{e}" for e in range(8)]

        def assign(pending, rows):
            return dispatcher._assign(set(pending), {uid: [] for uid in pending}, {}, dict.fromkeys(pending, rows), False)

        assert len(assign(uids[:2], 1)) == 1  # a decoding step of one sequence: its 2 experts in one RPC
        assert sorted(map(len, assign(uids, 2).values())) == [4, 4]  # of 8 sequences: both nodes, evenly
        big = assign(uids, AFFINITY_MAX_ROWS + 1)  # big batches: each expert to its best replica
        assert sum(map(len, big.values())) == 8
    finally:
        dispatcher.close()


def test_dispatcher_makes_its_channels_only_on_its_event_loop():
    from moeswarm.model.dispatcher import DispatchConfig, Dispatcher

    dispatcher = Dispatcher(directory=None, model="m", config=DispatchConfig())
    try:
        with pytest.raises(RuntimeError, match="on its event loop"):
            dispatcher.clients.get("127.0.0.1:1")

        async def make():
            return dispatcher.clients.get("127.0.0.1:1")

        assert dispatcher.run(make(), timeout_s=5).endpoint == "127.0.0.1:1"
    finally:
        dispatcher.close()


def test_dispatcher_loops_skip_grpc_events_of_closed_loops_and_report_the_rest(caplog):
    from moeswarm.model.loop_runner import new_event_loop

    class PollerCompletionQueue:  # the repr grpc's handle carries: functools.partial(<bound method PollerCompletionQueue._handle_events ...>)
        def _handle_events(self):
            pass

    loop = new_event_loop()
    try:
        late = loop.call_soon(PollerCompletionQueue()._handle_events)
        other = loop.call_soon(lambda: None)
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            loop.call_exception_handler({"message": "Exception in callback", "exception": RuntimeError("Event loop is closed"), "handle": late})
            assert not caplog.records
            loop.call_exception_handler({"message": "Exception in callback", "exception": RuntimeError("Event loop is closed"), "handle": other})
            loop.call_exception_handler({"message": "Exception in callback", "exception": ValueError("a bug"), "handle": late})
        assert [str(r.exc_info[1]) for r in caplog.records] == ["Event loop is closed", "a bug"]
    finally:
        loop.close()


def test_split_rows_keeps_each_request_under_its_limits_and_covers_every_row_once():
    assert split_rows({"a": torch.zeros(100, 8)}, max_bytes=100 * 32, max_rows=100) is None  # fits: one request
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        rows = torch.randint(0, 60, (int(torch.randint(1, 5, (1,), generator=generator)),), generator=generator).tolist()
        inputs = {f"m.L0.E{i}": torch.zeros(n, 4) for i, n in enumerate(rows)}  # 16 bytes a row
        max_bytes, max_rows = int(torch.randint(8, 400, (1,), generator=generator)), int(torch.randint(1, 40, (1,), generator=generator))
        pieces = split_rows(inputs, max_bytes, max_rows)
        if pieces is None:
            assert all(n <= max_rows for n in rows) and 16 * sum(rows) <= max_bytes
            continue
        for piece in pieces:
            sizes = [r.stop - r.start for r in piece.values()]
            assert all(n <= max_rows for n in sizes)
            assert 16 * sum(sizes) <= max_bytes or sizes == [1] or sum(sizes) == 0  # a row over the budget goes alone
        for uid, x in inputs.items():  # every row once, in order
            spans = [piece[uid] for piece in pieces if uid in piece]
            assert spans and spans[0].start == 0 and spans[-1].stop == x.shape[0]
            assert all(a.stop == b.start for a, b in zip(spans, spans[1:]))


def test_split_rows_of_a_huge_expert_batch_cuts_it_at_the_row_limit():
    pieces = split_rows({"e": torch.zeros(20_000, 2)}, max_bytes=1 << 30, max_rows=8192)
    assert pieces == [{"e": slice(0, 8192)}, {"e": slice(8192, 16384)}, {"e": slice(16384, 20_000)}]
