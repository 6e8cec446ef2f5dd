"""A training forward through RemoteExperts leaves no reference cycle: once the caller drops the
graph, its outputs and routing rows are freed at once, not at the next full garbage collection
(which a long-running client reaches minutes apart, holding every step's tensors until then)."""

from __future__ import annotations

import gc
import weakref

import torch

from moeswarm.model.dispatcher import DispatchResult
from moeswarm.model.expert_rows import group_rows
from moeswarm.model.remote_moe import RemoteExperts

UIDS = [f"m.L0.E{e}" for e in range(4)]


def test_outputs_and_rows_of_a_training_forward_are_freed_without_the_cycle_collector():
    topk_ids_TK = torch.tensor([[0, 1], [2, 3], [1, 2]])
    rows = group_rows(topk_ids_TK, UIDS)
    result = DispatchResult(torch.randn(3, 2, 8), torch.ones(3, 2, dtype=torch.bool), rows, {uid: "127.0.0.1:1" for uid in rows}, {})
    x_TD = torch.randn(3, 8, requires_grad=True)
    anchor = torch.empty(0, requires_grad=True)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        y_TKD = RemoteExperts.apply(x_TD, anchor, None, result, True)
        assert y_TKD.grad_fn is not None
        outputs, routing = weakref.ref(result.y_TKD), weakref.ref(rows[UIDS[0]].token_idx)
        del y_TKD, result, rows
        assert outputs() is None and routing() is None
    finally:
        if was_enabled:
            gc.enable()
