"""`from_pretrained` for the swarm: the transformers model of a local MoE checkpoint with its routed
experts served by swarm nodes (router, shared experts, attention and embeddings stay here).

    model = moeswarm.model.from_pretrained("path/to/Mixtral-tiny", initial_peers=[MADDR])
    out = model.generate(ids, max_new_tokens=32)
    model.moeswarm_client.close()

Shapes: T tokens, H hidden size, K experts per token.
"""

from __future__ import annotations

import pathlib
import torch

from moeswarm.model.dispatcher import DispatchConfig
from moeswarm.model.hf_checkpoint import CheckpointReader
from moeswarm.model.hf_spec import default_model_name, swarm_spec
from moeswarm.model.remote_moe import SwarmClient, RemoteExperts, check_min_experts
from moeswarm.protocol.codec import WIRE_NAME_OF
from moeswarm.protocol.spec import ModelSpec



class SwarmExpertBackend:
    """hf_remote.ExpertBackend over the swarm: one dispatch per MoE layer call (one RPC per node).
    Every routed slot must be served: transformers' outputs have no "expert dropped" case, so a slot
    whose replicas all failed raises AllReplicasFailed naming the expert and the endpoints tried."""

    def __init__(self, client: SwarmClient, spec: ModelSpec):
        self.client = client
        self._anchor = torch.empty(0, requires_grad=True)  # backward reaches the nodes even for frozen inputs
        self.uids = {layer: [spec.uid(layer, e) for e in range(spec.n_experts)] for layer in spec.layers_with_experts()}
        client.directory.track([uid for uids in self.uids.values() for uid in uids])
        client.directory.warn_if_missing([uid for uids in self.uids.values() for uid in uids])

    def __call__(
        self, layer: int, hidden_TH: torch.Tensor, top_k_index_TK: torch.Tensor, *, train_experts: bool = True
    ) -> torch.Tensor:
        uids = self.uids[layer]
        train_experts = train_experts and torch.is_grad_enabled()
        result = self.client.dispatch(uids, hidden_TH, top_k_index_TK, keep_activations=train_experts)
        check_min_experts(result, top_k_index_TK, uids, min_experts=top_k_index_TK.shape[1])
        y_TKH = result.y_TKD
        if torch.is_grad_enabled():  # backward sends the output grads to the serving replicas
            anchor = self._anchor if train_experts else self._anchor.detach()
            y_TKH = RemoteExperts.apply(hidden_TH, anchor, self.client.dispatcher, result, train_experts)
        # Node outputs are in the model dtype; the dispatcher widened them to fp32 exactly. Back to the
        # model dtype so the combine multiplies and sums in the same dtypes as transformers does.
        return y_TKH.to(hidden_TH.dtype)


def wire_dtype_of(dtype: torch.dtype) -> str:
    """The wire dtype for a model computed in `dtype`: its own where it has one (bf16 stays bf16)."""
    return WIRE_NAME_OF.get(dtype, "float32")


def checkpoint_dtype(model_dir: str | pathlib.Path) -> torch.dtype:
    """The dtype the checkpoint's weights are stored in (what from_pretrained computes in by default)."""
    with CheckpointReader(model_dir) as reader:
        return reader.family.dtype


def from_pretrained(
    model_dir: str | pathlib.Path,
    *,
    initial_peers: list[str] | str,
    name: str | None = None,
    swarm: str = "default",
    dispatch: DispatchConfig | None = None,
    dtype: torch.dtype | None = None,
    dht=None,
):
    """The transformers causal LM of `model_dir` with its routed experts on the swarm.

    name: the model's name in the swarm (default: the checkpoint folder's name, as `moeswarm node
    --model` uses). dtype: as from_pretrained's, default the checkpoint's; activations travel in it.
    The returned model has `.moeswarm_client` (close it when done). Training works as for RemoteMoE:
    backward returns input grads from the nodes, which accumulate their experts' grads and step their
    own optimizers. dht: an IsolatedDHT to share (see SwarmClient).
    """
    from moeswarm.model.hf_remote import load_remote_model

    with CheckpointReader(model_dir) as reader:
        family = reader.family
    spec = swarm_spec(family, name or default_model_name(model_dir))
    config = dispatch or DispatchConfig(wire_dtype=wire_dtype_of(dtype or family.dtype))
    client = SwarmClient(initial_peers, model=spec.name, swarm=swarm, config=config, dht=dht)
    try:
        model = load_remote_model(model_dir, SwarmExpertBackend(client, spec), dtype=dtype)
    except BaseException:
        client.close()
        raise
    model.moeswarm_client = client
    return model
