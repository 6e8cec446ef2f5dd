"""Session hygiene. Processes leave sockets in the temp dir that only a clean exit removes: Python's
multiprocessing a folder per process (pymp-*, with its listener sockets), hivemind's p2pd and its
clients a socket file each (hivemind-*.sock). The processes the tests kill -9 (many tests do, and the
fixtures' teardown) leave theirs: over a hundred of each per run of the suite. At the end of the
session, those made during it whose sockets no live process holds are removed."""

from __future__ import annotations

import pathlib
import shutil
import tempfile
import time

import pytest


@pytest.fixture(scope="session", autouse=True)
def _remove_the_temp_sockets_of_killed_processes():
    started = time.time()
    yield
    remove_orphaned_sockets(since=started)


def remove_orphaned_sockets(since: float) -> int:
    """Remove, from the temp dir, pymp-* folders and hivemind-*.sock files changed since `since`
    whose sockets no live process has bound (Linux: /proc/net/unix); returns how many. Elsewhere,
    nothing. bind() makes a socket's file, so what another process is setting up is an empty folder
    or a bound socket: never removed."""
    try:
        bound = {line.split()[-1] for line in pathlib.Path("/proc/net/unix").read_text().splitlines()[1:] if len(line.split()) >= 8}
    except OSError:
        return 0
    removed = 0
    temp = pathlib.Path(tempfile.gettempdir())
    for path in [*temp.glob("pymp-*"), *temp.glob("hivemind-*.sock")]:
        try:
            if path.stat().st_mtime < since:
                continue
            sockets = [str(entry) for entry in path.iterdir()] if path.is_dir() else [str(path)]
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if not sockets or any(socket in bound for socket in sockets):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed += 1
    return removed
