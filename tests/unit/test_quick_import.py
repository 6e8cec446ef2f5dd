"""protocol/quick_import.py: a library imported at a process's start is kept out of the cyclic GC's work."""

from __future__ import annotations

import gc
import importlib
import json
import subprocess
import sys

from moeswarm.protocol.quick_import import import_with_gc_paused

_FRESH = """
import gc, json, sys
from moeswarm.protocol.quick_import import import_with_gc_paused
import_with_gc_paused("torch")
print(json.dumps(["torch" in sys.modules, gc.get_stats()[2]["collections"], gc.get_freeze_count(), gc.isenabled()]))
"""


def test_a_fresh_process_imports_torch_without_a_full_collection_and_freezes_it():
    done = subprocess.run([sys.executable, "-c", _FRESH], capture_output=True, text=True, timeout=120)
    loaded, full_collections, frozen, enabled = json.loads(done.stdout)
    assert loaded and full_collections == 0
    assert frozen > 100_000
    assert enabled


def test_a_module_already_loaded_leaves_the_gc_as_the_process_had_it():
    importlib.import_module("torch")  # loaded in this process, as in a user's that calls us

    frozen = gc.get_freeze_count()
    gc.disable()
    try:
        import_with_gc_paused("torch")
        assert (gc.get_freeze_count(), gc.isenabled()) == (frozen, False)
    finally:
        gc.enable()
