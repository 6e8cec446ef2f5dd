"""What bench/soak.py measures: per-process RSS/PSS/FDs/threads from /proc, a SwarmClient's in-process
state, a run dir's size, and the growth of each series after warm-up (slope, flag)."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import pathlib
import threading

from common import Figure, memory_of, process_tree

# growth (mean of the last samples - mean of the first ones after warm-up) above which a series GROWS
TOLERANCE = {"rss_mib": 8.0, "pss_mib": 8.0, "fds": 4, "threads": 2, "files": 5, "mib": 5.0, "py_objects": 5000}
STATE_TOLERANCE = 2  # counts of client state (channels, health entries, tasks)
EDGE_SAMPLES = 3  # samples averaged at each end


@dataclasses.dataclass
class Series:
    name: str
    points: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # (monotonic s, value)


class ProcessProbe:
    def tree(self, root: str, pid: int, exclude: frozenset[int] = frozenset()) -> dict[str, dict[str, float]]:
        """{name: figures} of `pid` (named root) and its descendants not in exclude, named
        root.<comm> (root.<comm>2 for a second one of the same name)."""
        out: dict[str, dict[str, float]] = {}
        for i, child in enumerate(p for p in process_tree(pid) if p not in exclude):
            try:
                figures = process_figures(child)
                comm = pathlib.Path(f"/proc/{child}/comm").read_text().strip()
            except OSError:  # exited while we looked
                continue
            name = root if i == 0 else f"{root}.{comm}"
            while name in out:
                name += "+"
            out[name] = figures
        return out


def process_figures(pid: int) -> dict[str, float]:
    memory = memory_of(pid)
    threads = next(int(line.split()[1]) for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Threads:"))
    return {
        "rss_mib": round(memory["rss_kib"] / 1024, 2),
        "pss_mib": round(memory["pss_kib"] / 1024, 2),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": threads,
    }


def client_state(client) -> dict[str, float]:
    """Sizes of a SwarmClient's in-process structures that could grow with time, peers or calls."""
    dispatcher, directory = client.dispatcher, client.directory
    picker = dispatcher.picker

    async def tasks() -> int:
        return len(asyncio.all_tasks())

    view = directory._view
    return {
        "grpc_channels": len(dispatcher.clients.clients),
        "replica_health": len(picker._health),
        "banned": sum(picker.is_banned(endpoint) for endpoint in list(picker._health)),
        "directory_uids": len(directory._uids),
        "directory_records": sum(len(records) for records in view.values()),
        "loop_tasks": dispatcher.run(tasks(), timeout_s=10),
        "py_threads": threading.active_count(),
        "py_objects": len(gc.get_objects()),
    }


def dir_usage(path: pathlib.Path) -> dict[str, float]:
    files, size = 0, 0
    for folder, _, names in os.walk(path):
        for name in names:
            try:
                size += os.stat(os.path.join(folder, name)).st_size
            except OSError:
                continue
            files += 1
    return {"files": files, "mib": round(size / 2**20, 3)}


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of value over time, per hour."""
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var_t = sum((t - mean_t) ** 2 for t, _ in points)
    return 0.0 if var_t == 0 else 3600 * sum((t - mean_t) * (v - mean_v) for t, v in points) / var_t


def tolerance_of(name: str) -> float:
    if ".state." in name:
        return TOLERANCE.get(name.rsplit(".", 1)[1], STATE_TOLERANCE)
    return TOLERANCE.get(name.rsplit(".", 1)[1], 0.0)


def growth_figures(series: dict[str, Series], warmup_s: float) -> list[Figure]:
    """One figure per series with enough samples after warm-up: its slope per hour, flagged (MISS)
    when it grew by more than its tolerance. A restarted node's incarnations are separate series,
    each with its own warm-up (a fresh process grows while it loads and serves its first calls)."""
    figures = []
    for name in sorted(series):
        start = series[name].points[0][0]
        points = [(t, v) for t, v in series[name].points if t - start >= warmup_s]
        if len(points) < 2 * EDGE_SAMPLES:
            continue
        first = sum(v for _, v in points[:EDGE_SAMPLES]) / EDGE_SAMPLES
        last = sum(v for _, v in points[-EDGE_SAMPLES:]) / EDGE_SAMPLES
        slope, tol = slope_per_hour(points), tolerance_of(name)
        grows = last - first > tol and slope > 0
        label = f"{name} {first:.4g}->{last:.4g}"
        figures.append(Figure(f"{name}.slope_per_h", label[:44], round(slope, 3), "/h", f"+{tol:g}", not grows))
    return figures
