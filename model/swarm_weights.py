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
) -> dict[str, dict[str, torch.Tensor]]:
    """uid -> weights of its replica with the most optimizer steps that answers; AllReplicasFailed
    names the endpoints tried for an expert no replica gave."""
    pulled, unreachable = {}, set()
    for done, (uid, replicas) in enumerate(records.items(), start=1):
        _, version, pulled[uid] = await fetch_newest(
            uid, replicas, expected, max_message_bytes=max_message_bytes, unreachable=unreachable
        )
        if progress is not None:
            progress(done, len(records), uid, version)
    return pulled


def pull_swarm_experts(client, uids: list[str], expected: Expected, progress: Progress | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """pull_experts for `uids` through a SwarmClient (its DHT view and event loop); blocks."""
    records = find_experts(client.dht, client.directory.swarm, uids)
    return client.dispatcher.run(pull_experts(records, expected, progress=progress))
