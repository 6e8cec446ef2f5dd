"""How a Hugging Face MoE checkpoint appears in the swarm: its model name and the ModelSpec its
experts share. Used by nodes (no transformers needed) and by the client, so both derive the same UIDs."""

from __future__ import annotations

import pathlib
import re

from moeswarm.model.hf_checkpoint import HFFamily
from moeswarm.protocol.spec import ModelSpec


def default_model_name(model_dir: str | pathlib.Path) -> str:
    """The checkpoint directory's name as a model name ("Mixtral-8x7B-v0.1" -> "mixtral-8x7b-v0-1").
    Nodes and clients of one swarm must agree on it; pass an explicit name when directories differ."""
    base = re.sub(r"[^a-z0-9_-]+", "-", pathlib.Path(model_dir).resolve().name.lower()).strip("-_")
    return base[:64] or "hf-model"


def swarm_spec(family: HFFamily, name: str) -> ModelSpec:
    """Routed experts only: shared experts, routers and attention stay on the client."""
    return ModelSpec(
        name=name, d_model=family.hidden_size, d_ff=family.expert_intermediate_size, n_layers=family.num_layers,
        n_experts=family.num_experts, moe_layers=tuple(family.moe_layers), expert_kind=family.expert_kind,
    )
