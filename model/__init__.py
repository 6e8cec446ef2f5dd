"""Client side: expert math, routing, the MoE transformer and generation (pure torch: experts.py,
routing.py, local_moe.py, transformer.py, generation.py), the swarm client (expert_client.py,
directory.py, replicas.py, dispatcher.py, remote_moe.py, lm.py) and Hugging Face import (hf_*.py).

`moeswarm.model.from_pretrained(dir, initial_peers=[...])` loads a Hugging Face MoE checkpoint with its
experts on the swarm (imported on first use: it needs transformers)."""

import moeswarm.protocol  # noqa: F401  (sets hivemind's sharing strategy before hivemind loads)


def __getattr__(name: str):
    if name == "from_pretrained":
        from moeswarm.model.hf_swarm import from_pretrained

        return from_pretrained
    raise AttributeError(f"module 'moeswarm.model' has no attribute {name!r}")
