"""Import a large library at a process's start without the cyclic GC walking it.

Importing torch leaves ~250k objects that the cyclic GC tracks. While they loaded, Python ran 3 full
collections over them in a node's start (67 ms each on a 2-core VM, freeing 345 objects in all), and
every later full collection walked them again. Imported with the GC off and then frozen (moved out of its view: module objects live as
long as the process), a node's launch to visible in the DHT went from 1.60 to 1.35 s (median of 6
alternating launches each) and `moeswarm status` from 1.74 to 1.30 s.
"""

from __future__ import annotations

import gc
import importlib
import sys


def import_with_gc_paused(name: str) -> None:
    """Import module `name` with the cyclic GC off, then freeze every object made so far. For a
    process of ours, first thing: a no-op where `name` is loaded already, so a process that called us
    from Python (its GC tuned its own way) keeps its GC state."""
    if name in sys.modules:
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        importlib.import_module(name)
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
