"""Where a node's expert weights come from: a moeswarm model directory (moeswarm-model.json) or a
Hugging Face checkpoint (config.json + safetensors). Only the hosted experts' tensors are read."""

from __future__ import annotations

import asyncio
import logging
import pathlib
import time

import torch
from torch import nn

from moeswarm.protocol import expert_pb2
from moeswarm.protocol.errors import ConfigError, MoeSwarmError
from moeswarm.protocol.records import NodeRecord
from moeswarm.protocol.spec import ModelSpec, parse_uid

logger = logging.getLogger(__name__)
PROGRESS_EVERY_S = 5.0
SPEC_CHECK_TIMEOUT_S = 5.0  # one Info call to a node whose record disagrees with this node's spec
MAX_SPEC_CHECKS = 16  # disagreeing node records checked at start (any peer can sign some): bounds the calls


def is_hf_checkpoint(model_dir: str | pathlib.Path) -> bool:
    from moeswarm.model.model_dir import MANIFEST

    path = pathlib.Path(model_dir)
    return (path / "config.json").exists() and not (path / MANIFEST).exists()


def spec_of(model_dir: str | pathlib.Path, name: str | None = None) -> ModelSpec:
    """The expert spec a model directory or checkpoint defines (name: the HF model name to use)."""
    if is_hf_checkpoint(model_dir):
        from moeswarm.model.hf_checkpoint import CheckpointReader
        from moeswarm.model.hf_spec import default_model_name, swarm_spec

        with CheckpointReader(model_dir) as reader:
            return swarm_spec(reader.family, name or default_model_name(model_dir))
    from moeswarm.model.model_dir import read_manifest

    spec = read_manifest(model_dir).config.spec()
    if name is not None and name != spec.name:
        raise ConfigError(f"model directory {model_dir} holds model {spec.name!r}, not {name!r}")
    return spec


def load_expert_modules(
    model_dir: str, spec: ModelSpec, uids: tuple[str, ...], device: torch.device | str = "cpu"
) -> dict[str, nn.Module]:
    """The hosted experts' modules on `device`, after checking the directory holds the node's model
    and experts. Each expert moves to the device as it is read, so a GPU node never holds all of them
    in CPU memory at once; progress is logged every few seconds (a big checkpoint takes minutes)."""
    found = spec_of(model_dir, spec.name)
    if found != spec:
        raise ConfigError(f"{model_dir} holds experts of shape {found}, but this node is configured for {spec}")
    progress = _Progress(len(uids), model_dir)
    if is_hf_checkpoint(model_dir):
        modules = _load_hf(model_dir, uids, device, progress)
    else:
        from moeswarm.model.experts import SwiGLUExpert
        from moeswarm.model.model_dir import load_expert_weights, read_manifest

        modules = {}
        for uid, weights in load_expert_weights(read_manifest(model_dir), list(uids)).items():
            modules[uid] = SwiGLUExpert(spec.d_model, spec.d_ff)
            modules[uid].load_state_dict(weights)
            progress.add(modules[uid].to(device))
    progress.done()
    return modules


def expert_origins(model_dir: str, uids: tuple[str, ...]) -> dict[str, str]:
    """uid -> the origin a node announces for each hosted expert it loads from `model_dir`
    (ExpertRecord.origin); none for a Hugging Face checkpoint (its files carry no checksums, and
    hashing every expert's bytes would cost a big node seconds at each start)."""
    if is_hf_checkpoint(model_dir):
        return {}
    from moeswarm.model.model_dir import read_manifest

    origins = read_manifest(model_dir).expert_origins()
    return {uid: origins.get(uid, "") for uid in uids}


def _load_hf(model_dir: str, uids: tuple[str, ...], device, progress: "_Progress") -> dict[str, nn.Module]:
    from moeswarm.model.hf_checkpoint import CheckpointReader
    from moeswarm.model.hf_experts import expert_from_weights

    with CheckpointReader(model_dir) as reader:
        family = reader.family
        pairs = {uid: (parse_uid(uid).layer, parse_uid(uid).expert) for uid in uids}
        reader.check_experts(pairs.values())
        modules = {}
        for uid, pair in pairs.items():
            module = expert_from_weights(family.expert_kind, reader.read_expert(*pair), **family.expert_params())
            modules[uid] = module.to(device)
            # Unmap after each expert: the file pages it touched count in the node's RSS while mapped,
            # which made the peak 2x the hosted bytes (bench/hf_generate.py); reopening costs a header parse.
            reader.close()
            progress.add(modules[uid])
        return modules


class _Progress:
    """Logs 'loaded 12/64 experts (4.1 GB) in 10 s' at most every PROGRESS_EVERY_S, and a last line."""

    def __init__(self, total: int, source: str):
        self.total, self.source, self.count, self.bytes = total, source, 0, 0
        self.started = self.last = time.monotonic()

    def add(self, module: nn.Module) -> None:
        self.count += 1
        self.bytes += sum(p.numel() * p.element_size() for p in module.parameters())
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S and self.count < self.total:
            self.last = now
            logger.info("loaded %s", self._line(now))

    def done(self) -> None:
        logger.info("loaded %s from %s", self._line(time.monotonic()), self.source)

    def _line(self, now: float) -> str:
        return f"{self.count}/{self.total} experts ({self.bytes / 1e9:.2f} GB) in {now - self.started:.1f} s"


class _ExpertLayout:
    """The part of a checkpoint's layout `parse_expert_spec` needs, for any ModelSpec."""

    def __init__(self, spec: ModelSpec):
        self.moe_layers, self.num_experts = spec.layers_with_experts(), spec.n_experts

    def check_experts(self, pairs) -> None:
        from moeswarm.model.hf_checkpoint import format_ranges

        for layer, expert in pairs:
            if layer not in self.moe_layers:
                raise ConfigError(f"layer {layer} has no experts in this model (MoE layers: {format_ranges(self.moe_layers)})")
            if not 0 <= expert < self.num_experts:
                raise ConfigError(f"expert {expert} does not exist (this model has {self.num_experts} experts per layer, 0-{self.num_experts - 1})")


def uids_from_text(text: str, spec: ModelSpec) -> list[str]:
    """UIDs named by an expert spec such as "layers 0-3, experts 0-7" or "all"."""
    from moeswarm.model.hf_checkpoint import parse_expert_spec

    return [spec.uid(layer, expert) for layer, expert in parse_expert_spec(text, _ExpertLayout(spec))]


async def check_swarm_agrees(dht, swarm: str, spec: ModelSpec, own_peer_id: str) -> None:
    """Refuse to join a swarm where a node serves a model of the same name with other shapes (a client
    would otherwise get mismatched experts from different replicas): an operator's config mistake.
    Any peer can sign a node record saying so, so a record counts only once the node it names
    confirms it over Info at the endpoint it announced; one that does not is logged and ignored."""
    from moeswarm.model.directory import nodes_with_other_shapes

    disagreeing = await asyncio.to_thread(nodes_with_other_shapes, dht, swarm, spec, own_peer_id)
    if len(disagreeing) > MAX_SPEC_CHECKS:
        logger.warning("%d node records disagree with model %r; checking %d of them", len(disagreeing), spec.name, MAX_SPEC_CHECKS)
    checked = disagreeing[:MAX_SPEC_CHECKS]
    doubts = await asyncio.gather(*(_doubt(record, theirs) for record, theirs in checked))
    for (record, theirs), doubt in zip(checked, doubts):
        if doubt is not None:
            logger.warning(
                "ignoring the node record of %s (%s), which says swarm %r serves model %r as %s: %s (the node is down, or a peer is "
                "signing false records): joining anyway", record.peer_id, record.endpoint, swarm, spec.name, theirs, doubt,
            )
    for (record, theirs), doubt in zip(checked, doubts):
        if doubt is None:
            raise ConfigError(
                f"swarm {swarm!r} already serves model {spec.name!r} as {theirs} (node {record.endpoint}, confirmed over Info); "
                f"this node's experts are {spec}. Use another model name or the same checkpoint."
            )


async def _doubt(record: NodeRecord, theirs: ModelSpec) -> str | None:
    """None if the node at record.endpoint confirms it serves `theirs` as record.peer_id; else why not."""
    from moeswarm.model.expert_client import ExpertClient

    client = ExpertClient(record.endpoint)
    try:
        info = await client.info(timeout_s=SPEC_CHECK_TIMEOUT_S)
    except MoeSwarmError as e:
        return f"its endpoint did not answer Info ({e})"
    finally:
        await client.close()
    return spec_doubt(info, record.peer_id, theirs)


def spec_doubt(info: expert_pb2.InfoResponse, peer_id: str, theirs: ModelSpec) -> str | None:
    """Why an Info answer does not confirm a node record (peer_id: its signer's) announcing `theirs`,
    or None if it does. Info names the peer and the model's dimensions (not moe_layers or
    expert_kind): the record itself, signed by the peer that answers, says the rest. Pure."""
    if info.peer_id != peer_id:
        return f"its endpoint answers as peer {info.peer_id[:64]!r}"
    model = info.model
    if (model.name, model.d_model, model.d_ff, model.n_layers, model.n_experts) != (
        theirs.name, theirs.d_model, theirs.d_ff, theirs.n_layers, theirs.n_experts
    ):
        return (
            f"its endpoint serves {model.name[:64]!r} with d_model={model.d_model}, d_ff={model.d_ff}, "
            f"n_layers={model.n_layers}, n_experts={model.n_experts}"
        )
    return None
