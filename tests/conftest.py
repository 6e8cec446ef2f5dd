"""Session hygiene. Python's multiprocessing keeps a folder per process in the temp dir (pymp-*, with
its listener sockets) and removes it at a clean exit; the processes the tests kill -9 (many tests
do, and the fixtures' teardown) leave theirs: about 120 per run of the suite. At the end of the
session, those made during it whose sockets no live process holds are removed."""

from __future__ import annotations

import pathlib
import shutil
import tempfile
import time

import pytest


@pytest.fixture(scope="session", autouse=True)
def _remove_the_temp_folders_of_killed_processes():
    started = time.time()
    yield
    remove_orphaned_multiprocessing_dirs(since=started)


def remove_orphaned_multiprocessing_dirs(since: float) -> int:
    """Remove pymp-* folders changed since `since` that hold sockets, none of them bound by a live
    process (Linux: /proc/net/unix); returns how many. Elsewhere, nothing. (bind() makes the socket
    file, so a folder another process is setting up is empty or has a bound socket: never removed.)"""
    try:
        bound = {line.split()[-1] for line in pathlib.Path("/proc/net/unix").read_text().splitlines()[1:] if len(line.split()) >= 8}
    except OSError:
        return 0
    removed = 0
    for folder in pathlib.Path(tempfile.gettempdir()).glob("pymp-*"):
        try:
            entries = [str(path) for path in folder.iterdir()] if folder.stat().st_mtime >= since else []
            if not entries or any(entry in bound for entry in entries):
                continue
        except OSError:  # gone meanwhile, or not ours to read
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed += 1
    return removed
