"""Expert weights pulled from the swarm: the most trained replica of each expert, over the nodes'
ExportState call (protocol/state_transfer.py), e.g. to save a model whose experts were trained there."""

from __future__ import annotations

from typing import Callable

import torch

from moeswarm.model.directory import find_experts
from moeswarm.protocol.records import ExpertRecord
from moeswarm.protocol.state_transfer import fetch_newest

Expected = dict[str, tuple[tuple[int, ...], torch.dtype]]  # parameter name -> (shape, dtype)
Progress = Callable[[int, int, str, int], None]  # (done, total, uid, version)


async def pull_experts(
    records: dict[str, list[ExpertRecord]], expected: Expected, *, max_message_bytes: int = 64 << 20,
    progress: Progress | None = None,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """(uid -> weights, uid -> origin) of each expert's replica with the most optimizer steps that
    answers; AllReplicasFailed names the endpoints tried for an expert no replica gave."""
    pulled, origins, unreachable = {}, {}, set()
    for done, (uid, replicas) in enumerate(records.items(), start=1):
        record, version, pulled[uid] = await fetch_newest(
            uid, replicas, expected, max_message_bytes=max_message_bytes, unreachable=unreachable
        )
        origins[uid] = record.origin
        if progress is not None:
            progress(done, len(records), uid, version)
    return pulled, origins


def pull_swarm_experts(
    client, uids: list[str], expected: Expected, progress: Progress | None = None,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """pull_experts for `uids` through a SwarmClient (its DHT view, its preferred replicas, its event
    loop); blocks."""
    found = find_experts(client.dht, client.directory.swarm, uids)
    records = {uid: client.directory.prefer_origin(uid, replicas) for uid, replicas in found.items()}
    return client.dispatcher.run(pull_experts(records, expected, progress=progress))
