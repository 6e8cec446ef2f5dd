"""Build the MoE language model locally or on the swarm, and load / save it as a model directory.

    with open_model(DIR, initial_peers=[MADDR]) as lm:      # dense part here, experts on the swarm
        result = generate(lm.model, prompt, SamplingConfig(max_new_tokens=32))
"""

from __future__ import annotations

import dataclasses
import pathlib

import torch
from torch import nn

from moeswarm.model.lm_config import MoELMConfig
from moeswarm.model.local_moe import LocalMoE
from moeswarm.model.model_dir import (
    DENSE_FILE, MANIFEST, expert_shapes, load_dense_weights, load_expert_weights, read_manifest, save_model_dir,
)
from moeswarm.model.routing import make_gate
from moeswarm.model.tokenizer import ByteTokenizer
from moeswarm.model.transformer import MoETransformer, is_expert_param
from moeswarm.protocol.errors import ConfigError


def build_local_model(config: MoELMConfig) -> MoETransformer:
    """Every expert in this process (the reference the swarm must match)."""

    def moe(layer: int) -> LocalMoE:
        gate = make_gate(config.routing, config.d_model)
        return LocalMoE(model=config.name, layer=layer, d_model=config.d_model, d_ff=config.d_ff, seed=config.seed, gate=gate)

    return MoETransformer(config, moe)


def build_remote_model(config: MoELMConfig, client) -> MoETransformer:
    """Dense part here; each MoE layer a RemoteMoE through `client` (a SwarmClient for config.name)."""
    from moeswarm.model.remote_moe import RemoteMoE

    local_shared = (config.d_ff, config.seed) if config.shared_experts_local and config.routing.n_shared else None

    def moe(layer: int) -> RemoteMoE:
        gate = make_gate(config.routing, config.d_model)
        return RemoteMoE(
            model=config.name, layer=layer, d_model=config.d_model, client=client, min_experts=config.min_experts,
            gate=gate, local_shared=local_shared,
        )

    return MoETransformer(config, moe)


def held_experts(model: MoETransformer) -> dict[str, tuple[str, nn.Module]]:
    """uid -> (state_dict prefix, module) of every expert computed in this process: all routed ones of
    a local model, and shared experts that run on the client."""
    held = {}
    for i in model.config.moe_layers():
        moe = model.blocks[i].ffn
        for e, expert in enumerate(getattr(moe, "experts", ())):  # LocalMoE only: RemoteMoE has none
            held[moe.uids[e]] = (f"blocks.{i}.ffn.experts.{e}", expert)
        for s, expert in enumerate(moe.shared):
            held[moe.uids[moe.router.n_experts + s]] = (f"blocks.{i}.ffn.shared.{s}", expert)
    return held


def expert_weights(model: MoETransformer) -> dict[str, dict[str, torch.Tensor]]:
    """uid -> w1/w2/w3 of every expert held in this process (all of them for a local model)."""
    return {uid: {n: p.detach() for n, p in m.state_dict().items()} for uid, (_, m) in held_experts(model).items()}


def dense_state(model: MoETransformer) -> dict[str, torch.Tensor]:
    return {name: t for name, t in model.state_dict().items() if not is_expert_param(name)}


def save_model(
    model: MoETransformer, path: str | pathlib.Path, tokenizer: ByteTokenizer = ByteTokenizer(), *, client=None, progress=None,
) -> pathlib.Path:
    """Write a model as a model directory. Experts held in this process are saved from it; for a model
    whose experts run on the swarm, pass its SwarmClient (LoadedModel.client): the others are pulled
    from their most trained replicas (model/swarm_weights.py; progress(done, total, uid, version))."""
    experts = expert_weights(model)
    remote = [uid for uid in model.config.spec().all_uids() if uid not in experts]
    origins: dict[str, str] = {}  # of the experts pulled from the swarm
    if remote:
        if client is None:
            raise ConfigError(f"{len(remote)} experts of {model.config.name!r} run on the swarm: pass client= to pull them")
        from moeswarm.model.swarm_weights import pull_swarm_experts

        expected = {name: (shape, torch.float32) for name, shape in expert_shapes(model.config).items()}
        pulled, origins = pull_swarm_experts(client, remote, expected, progress)
        experts.update(pulled)
    return save_model_dir(path, model.config, dense_state(model), experts, tokenizer, origins=origins)


@dataclasses.dataclass
class LoadedModel:
    model: MoETransformer
    tokenizer: ByteTokenizer
    client: object | None = None  # the SwarmClient of a remote model; closed by close()

    def __enter__(self) -> "LoadedModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


def open_model(
    path: str | pathlib.Path, *, initial_peers: list[str] | str | None = None, swarm: str = "default", dispatch=None,
    dht=None,
) -> LoadedModel:
    """Load a model directory. With initial_peers the experts run on the swarm and only the dense part
    (plus shared experts that run locally) is read; without, every expert is loaded here.
    dht: an IsolatedDHT to share with other clients (see SwarmClient)."""
    manifest = read_manifest(path)
    config = manifest.config
    if initial_peers is None and dht is None:
        model = build_local_model(config)
        client = None
    else:
        from moeswarm.model.directory import warn_if_served_with_other_shapes
        from moeswarm.model.dispatcher import DispatchConfig
        from moeswarm.model.remote_moe import SwarmClient

        client = SwarmClient(initial_peers or (), model=config.name, swarm=swarm, config=dispatch or DispatchConfig(), dht=dht)
        client.directory.expect_origins(manifest.expert_origins())  # replicas of this directory's weights first
    try:
        if client is not None:
            model = build_remote_model(config, client)
            client.directory.warn_if_missing(config.remote_uids())
            warn_if_served_with_other_shapes(client.dht, swarm, config.spec())
        _load_weights(model, manifest)
    except BaseException:
        if client is not None:
            client.close()
        raise
    return LoadedModel(model.eval(), manifest.tokenizer, client)


def _load_weights(model: MoETransformer, manifest) -> None:
    """The dense part and the experts this process computes, from the directory (strict: all present)."""
    state = load_dense_weights(manifest)
    _check_dense(model, state, manifest)
    held = held_experts(model)
    for uid, weights in load_expert_weights(manifest, list(held)).items():
        state.update({f"{held[uid][0]}.{name}": tensor for name, tensor in weights.items()})
    model.load_state_dict(state, strict=True)


def _check_dense(model: MoETransformer, state: dict[str, torch.Tensor], manifest) -> None:
    """ConfigError, naming a tensor, where the dense file does not fit the manifest's config (an edited
    manifest, or a dense file from another model): load_state_dict's error would list every tensor."""
    expected = dense_state(model)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = [name for name in expected if name in state and state[name].shape != expected[name].shape]
    if not (missing or extra or wrong):
        return
    if wrong:
        name = wrong[0]
        problem = f"{name} has shape {list(state[name].shape)}, the config needs {list(expected[name].shape)}"
    else:
        problem = f"{missing[0]} is missing" if missing else f"it holds {extra[0]}, which the config has no place for"
    count = len(missing) + len(extra) + len(wrong)
    raise ConfigError(
        f"{manifest.path / DENSE_FILE} does not fit the config in {manifest.path / MANIFEST}: {problem}"
        f"{f' (and {count - 1} more tensors differ)' if count > 1 else ''}; was the manifest edited?"
    )
