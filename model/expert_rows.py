"""Which rows of a layer call go to which expert, and where the experts' outputs go back: pure
functions of the routing (top-k expert ids per token), used by the dispatcher on every call.

Legend: T tokens, K experts per token, D model dim, N rows of one expert.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class ExpertRows:
    """Read-only: the tensors of a one-token call's rows are shared by every call (_ONE_TOKEN_ROWS)."""

    token_idx: torch.Tensor  # [N] long: which tokens were routed to this expert
    slot_idx: torch.Tensor  # [N] long: in which of their k slots
    flat_idx: torch.Tensor  # [N] long: token_idx * k + slot_idx, the row in a [T * k, ...] view
    one_slot: int = -1  # the slot, as an int, when the call has one token (else -1)


def group_rows(topk_ids_TK: torch.Tensor, uids: list[str]) -> dict[str, ExpertRows]:
    """Which (token, slot) pairs each expert of the layer gets; ids < 0 mark slots not to send. Pure.
    Experts in increasing id order, rows in token order."""
    if topk_ids_TK.numel() <= SMALL_ROUTING_SLOTS:
        return _group_rows_small(topk_ids_TK, uids)
    # One stable sort of the flattened (token, slot) ids by expert, cut into one run per expert:
    # a fixed handful of torch ops, however many experts the layer has.
    K = topk_ids_TK.shape[1]
    flat_ids = topk_ids_TK.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    experts, counts = torch.unique_consecutive(flat_ids[order], return_counts=True)
    token_idx, slot_idx = order // K, order % K
    rows, start = {}, 0
    for expert, count in zip(experts.tolist(), counts.tolist()):
        if expert >= 0:
            run = slice(start, start + count)
            rows[uids[expert]] = ExpertRows(token_idx[run], slot_idx[run], order[run])
        start += count
    return rows


def gather_rows(x_TD: torch.Tensor, rows: dict[str, ExpertRows]) -> dict[str, torch.Tensor]:
    """Each expert's input rows {uid: x_ND}: one gather for the whole layer, then views of it."""
    if x_TD.shape[0] == 1 and all(r.token_idx.numel() == 1 for r in rows.values()):
        return dict.fromkeys(rows, x_TD)  # decoding one sequence: every expert gets the one token, no copy
    return gather_at(x_TD, rows, "token_idx")


def gather_at(x: torch.Tensor, rows: dict[str, ExpertRows], index: str) -> dict[str, torch.Tensor]:
    """{uid: x[rows[uid].<index>]}: per expert when there are few, else one gather split into views."""
    if len(rows) <= 2:
        return {uid: x[getattr(r, index)] for uid, r in rows.items()}
    gathered = x[torch.cat([getattr(r, index) for r in rows.values()])]
    return dict(zip(rows, gathered.split([r.token_idx.numel() for r in rows.values()])))


SMALL_ROUTING_SLOTS = 64  # up to this many (token, slot) pairs, plain Python beats a dozen tiny torch ops
_SLOTS = torch.arange(SMALL_ROUTING_SLOTS)
# Decoding one sequence: the rows of the expert in each slot, made once (token 0; its flat index is the slot).
_ONE_TOKEN_ROWS = tuple(ExpertRows(_SLOTS[:1], _SLOTS[s : s + 1], _SLOTS[s : s + 1], s) for s in range(SMALL_ROUTING_SLOTS))


def _group_rows_small(topk_ids_TK: torch.Tensor, uids: list[str]) -> dict[str, ExpertRows]:
    """group_rows for decoding-sized batches (a few tokens): same result, ~10x fewer microseconds.
    One tensor holds every expert's (token, slot, flat) indices; each ExpertRows views its columns."""
    K = topk_ids_TK.shape[1]
    ids = topk_ids_TK.tolist()
    if len(ids) == 1:  # one token, each expert in one slot (top-k picks distinct ones): no torch op at all
        slot_of = {expert: slot for slot, expert in enumerate(ids[0]) if expert >= 0}
        if len(slot_of) == sum(expert >= 0 for expert in ids[0]):
            return {uids[expert]: _ONE_TOKEN_ROWS[slot_of[expert]] for expert in sorted(slot_of)}
    buckets: dict[int, list[tuple[int, int]]] = {}
    for token, row in enumerate(ids):
        for slot, expert in enumerate(row):
            if expert >= 0:
                buckets.setdefault(expert, []).append((token, slot))
    if not buckets:
        return {}
    experts = sorted(buckets)
    pairs = [pair for e in experts for pair in buckets[e]]
    index_3N = torch.tensor([[t for t, _ in pairs], [s for _, s in pairs], [t * K + s for t, s in pairs]])
    parts = index_3N.split([len(buckets[e]) for e in experts], dim=1)
    return {uids[e]: ExpertRows(*part.unbind(0)) for e, part in zip(experts, parts)}


def scatter_outputs(
    topk_ids_TK: torch.Tensor, d_model: int, rows: dict[str, ExpertRows], outputs: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_TKD, served_TK): each answered expert's rows in its (token, slot) places, in fp32; zeros
    and False where an expert was not answered or a slot was not sent. One copy for all experts."""
    T, K = topk_ids_TK.shape
    answered = [uid for uid in rows if uid in outputs]
    if len(answered) == K and all(rows[uid].one_slot >= 0 for uid in answered):  # one token, every slot answered
        by_slot = sorted(answered, key=lambda uid: rows[uid].one_slot)
        return torch.cat([outputs[uid] for uid in by_slot]).float().view(1, K, d_model), torch.ones(1, K, dtype=torch.bool)
    y_TKD = torch.zeros(T, K, d_model, dtype=torch.float32)
    if not answered:
        return y_TKD, torch.zeros(T, K, dtype=torch.bool)
    flat_idx = torch.cat([rows[uid].flat_idx for uid in answered])
    y_TKD.view(T * K, d_model).index_copy_(0, flat_idx, torch.cat([outputs[uid] for uid in answered]).float())
    if len(answered) == len(rows):
        return y_TKD, topk_ids_TK >= 0
    served_TK = torch.zeros(T, K, dtype=torch.bool)
    served_TK.view(-1)[flat_idx] = True
    return y_TKD, served_TK
