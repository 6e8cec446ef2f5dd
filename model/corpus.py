"""The default text corpus: Python's own standard-library sources, present wherever Python is (no
downloads), as bytes for the byte-level tokenizer, and random training windows over it."""

from __future__ import annotations

import pathlib
import sysconfig

import torch


def stdlib_sources(max_bytes: int = 4 << 20) -> bytes:
    """Top-level *.py files of the running Python's standard library, in name order, up to max_bytes."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data[: max_bytes - total])
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    if not chunks:
        raise FileNotFoundError(f"no Python sources under {root}")
    return b"".join(chunks)


def random_windows(data_N: torch.Tensor, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """[batch, length + 1] token windows at random offsets (inputs are [:, :-1], targets [:, 1:])."""
    if data_N.numel() <= length + 1:
        raise ValueError(f"corpus of {data_N.numel()} tokens is too short for windows of {length + 1}")
    starts = torch.randint(0, data_N.numel() - length - 1, (batch,), generator=generator)
    return torch.stack([data_N[s : s + length + 1] for s in starts.tolist()])
