"""Files that survive a crash: write to a temp file, fsync it, rename it over the target, fsync the
folder. Used for node checkpoints, identity keys, ready files and model directories."""

from __future__ import annotations

import os
import pathlib
import tempfile


def write_atomic(path: pathlib.Path, write) -> None:
    """Call write(file) on a temp file beside `path`, fsync it, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        pathlib.Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: pathlib.Path) -> None:
    """Make the folder's entries (a rename, a new file) durable."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
