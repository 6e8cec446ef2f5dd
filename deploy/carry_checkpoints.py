"""`swarm up --run-dir`: the expert checkpoints of the last run, carried to the nodes of this one.

Each node keeps its checkpoints in its own folder of the run dir (node{i}/experts/{uid}.pt). A run
with other --nodes, --replicas or --placement than the last hosts experts on other nodes: without
this, a node that now hosts an expert whose checkpoint another node folder holds would start it
again from the model's weights, and the training since would be lost (replica sync, which copies a
peer's weights at start, races with the peers starting beside it). So before any node starts, each
node folder gets the newest checkpoint of every expert its node will host, where it has none, or
only an older one than a folder whose node no longer hosts that expert (the expert moved away and
back). Replicas that keep hosting an expert keep their own checkpoints: they average as they run.
"""

from __future__ import annotations

import logging
import pathlib
import re
import shutil
from typing import NamedTuple

from moeswarm.node.checkpoint import EXPERTS_DIR, expert_checkpoint_path
from moeswarm.protocol.durable import write_atomic

logger = logging.getLogger(__name__)
_NODE_DIR = re.compile(r"node(\d+)")


class _Checkpoint(NamedTuple):
    mtime: float
    node: int  # the node folder it is in
    path: pathlib.Path


def carry_checkpoints(run_dir: pathlib.Path, placement: list[list[str]]) -> int:
    """Copy checkpoints between the node folders of `run_dir` for `placement` (the experts of node i
    at index i), as the module docstring says; returns how many were copied."""
    found: dict[str, list[_Checkpoint]] = {}
    for node_dir in run_dir.glob("node*"):
        match = _NODE_DIR.fullmatch(node_dir.name)
        if match is None or not (node_dir / EXPERTS_DIR).is_dir():
            continue
        for path in (node_dir / EXPERTS_DIR).glob("*.pt"):
            found.setdefault(path.name[: -len(".pt")], []).append(_Checkpoint(path.stat().st_mtime, int(match[1]), path))
    copied = 0
    for node, uids in enumerate(placement):
        for uid in uids:
            if not (checkpoints := found.get(uid)):
                continue
            newest = max(checkpoints)
            own = next((c for c in checkpoints if c.node == node), None)
            moved_away = newest.node >= len(placement) or uid not in placement[newest.node]
            if own is None or (moved_away and newest.mtime > own.mtime):
                target = expert_checkpoint_path(run_dir / f"node{node}", uid)
                with open(newest.path, "rb") as source:
                    write_atomic(target, lambda file: shutil.copyfileobj(source, file, 1 << 20))
                copied += 1
    if copied:
        logger.info("carried %d expert checkpoint(s) to the nodes that host those experts in this run", copied)
    return copied
