"""The transformers model of a local MoE checkpoint with its routed experts executed by a backend.

Router, shared experts, attention, embeddings and norms run locally; no routed-expert weight is read
or allocated here. Each MoE layer hands (hidden, top-k ids) to an `ExpertBackend` and combines its
per-slot outputs exactly as transformers' default ("grouped_mm") experts function does.

Shapes: T tokens, H hidden size, K experts per token, N rows routed to one expert.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from moeswarm.model.experts import SwiGLUExpert
from moeswarm.model.hf_checkpoint import CheckpointReader, HFFamily
from moeswarm.model.hf_experts import GptOssExpert, expert_from_weights, hf_expert_forward
from moeswarm.protocol.errors import ConfigError, MoeSwarmError

logger = logging.getLogger(__name__)

EXPERTS_IMPLEMENTATION = "remote"  # our name in transformers' ALL_EXPERTS_FUNCTIONS


class ExpertBackend(Protocol):
    """Runs the routed experts of one MoE layer for a batch of tokens."""

    def __call__(
        self, layer: int, hidden_TH: torch.Tensor, top_k_index_TK: torch.Tensor, *, train_experts: bool = True
    ) -> torch.Tensor:
        """y_TKH: slot k of token t is expert top_k_index_TK[t, k] of `layer` applied to hidden_TH[t].
        train_experts: a backward may update the experts (False: eval mode, or experts frozen)."""
        ...


class LocalExpertBackend:
    """Computes routed experts in this process from a checkpoint, with the functions a node runs
    (`expert_forward` / `gpt_oss_forward`), one call per (layer, expert) on its token group.

    dtype: compute in this dtype instead of the checkpoint's (a node serving a bf16 copy of fp32 weights).
    Experts are read on first use and kept.
    """

    def __init__(self, reader: CheckpointReader, *, dtype: torch.dtype | None = None):
        self.reader, self.dtype = reader, dtype
        self._experts: dict[tuple[int, int], SwiGLUExpert | GptOssExpert] = {}

    def expert(self, layer: int, expert: int) -> SwiGLUExpert | GptOssExpert:
        """The module of one routed expert (ConfigError if the checkpoint has no such expert)."""
        key = (layer, expert)
        if key not in self._experts:
            family, weights = self.reader.family, self.reader.read_expert(layer, expert)
            weights = weights.to(self.dtype) if self.dtype is not None else weights
            self._experts[key] = expert_from_weights(family.expert_kind, weights, **family.expert_params())
        return self._experts[key]

    def __call__(
        self, layer: int, hidden_TH: torch.Tensor, top_k_index_TK: torch.Tensor, *, train_experts: bool = True
    ) -> torch.Tensor:
        num_tokens, k = top_k_index_TK.shape
        ids_N = top_k_index_TK.reshape(-1)  # slot n is token n // k
        # Rows in grouped_mm's order (its torch.sort): a GEMM row's last bits depend on where it sits
        # in the batch (M-tail kernels), so the same order makes fp32 bit-identical too.
        sorted_ids_N, order_N = torch.sort(ids_N)
        y_NH: torch.Tensor | None = None
        for expert in torch.unique(ids_N).tolist():
            slots = order_N[sorted_ids_N == expert]
            out = hf_expert_forward(self.expert(layer, expert), hidden_TH[slots // k])
            if y_NH is None:
                y_NH = out.new_empty(num_tokens * k, out.shape[-1])
            y_NH[slots] = out
        if y_NH is None:  # no tokens
            return hidden_TH.new_empty(num_tokens, k, hidden_TH.shape[-1])
        return y_NH.view(num_tokens, k, -1)


def remote_experts_forward(
    experts: nn.Module, hidden_TH: torch.Tensor, top_k_index_TK: torch.Tensor, top_k_weights_TK: torch.Tensor
) -> torch.Tensor:
    """transformers' experts hook: routed experts via the module's backend, combined as grouped_mm does.

    grouped_mm multiplies each expert output (model dtype) by its routing weight (fp32 for most
    routers, so the product is fp32), sums the K slots in that dtype and casts once; doing the same
    here keeps bf16 logits bit-identical (a bf16 index_add_ would not).
    """
    backend = experts.__dict__.get("moeswarm_backend")
    if backend is None:
        raise ConfigError("this experts module has no backend; build the model with load_remote_model()")
    # The experts' own parameters here are empty placeholders: the MoE block's others (its router) say
    # whether the block is frozen.
    train_experts = experts.training and all(param.requires_grad for param in experts.__dict__["moeswarm_block_params"])
    y_TKH = backend(experts.moeswarm_layer, hidden_TH, top_k_index_TK, train_experts=train_experts)
    expected = (*top_k_index_TK.shape, hidden_TH.shape[-1])
    if tuple(y_TKH.shape) != expected:
        raise MoeSwarmError(f"expert backend returned shape {tuple(y_TKH.shape)} for layer "
                            f"{experts.moeswarm_layer}; expected {expected}")
    weighted_TKH = y_TKH * top_k_weights_TK.unsqueeze(-1)
    return weighted_TKH.sum(dim=1).to(hidden_TH.dtype)


ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, remote_experts_forward)


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Move each nn.Parameter to the meta device as a module registers it; buffers stay real, so the
    non-persistent ones computed in __init__ (rotary inv_freq) keep their values. This is accelerate's
    init_empty_weights(include_buffers=False), which we do not depend on. Not thread-safe."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _attach_backend(model: PreTrainedModel, family: HFFamily, backend: ExpertBackend) -> set[str]:
    """Empty every routed-expert parameter (numel 0) and tag each experts module with its layer and
    backend (plain attributes, not submodules). Returns the emptied parameter names."""
    emptied: set[str] = set()
    for layer in family.moe_layers:
        name = family.experts_module.format(layer=layer)
        try:
            experts = model.get_submodule(name)
        except AttributeError as e:
            raise ConfigError(f"{type(model).__name__} has no {name}; config.json disagrees with the model") from e
        for pname, param in list(experts.named_parameters(recurse=False)):
            setattr(experts, pname, nn.Parameter(torch.empty(0, dtype=param.dtype), requires_grad=False))
            emptied.add(f"{name}.{pname}")
        experts.__dict__["moeswarm_layer"] = layer
        experts.__dict__["moeswarm_backend"] = backend
        block_name, _, local_name = name.rpartition(".")
        experts.__dict__["moeswarm_block_params"] = [  # the router's (and shared experts') weights
            param for pname, param in model.get_submodule(block_name).named_parameters() if not pname.startswith(local_name + ".")
        ]
    untagged = [n for n, m in model.named_modules() if n.endswith(".experts") and "moeswarm_backend" not in m.__dict__]
    if untagged:
        raise ConfigError(f"experts modules {untagged} are not in the MoE layers read from config.json")
    return emptied


def _keep_in_fp32(model: PreTrainedModel, dtype: torch.dtype) -> re.Pattern[str] | None:
    """Names transformers keeps in fp32 for this dtype (its `_keep_in_fp32_modules(_strict)` rule)."""
    patterns = list(model._keep_in_fp32_modules_strict or []) if dtype in (torch.float16, torch.bfloat16) else []
    if dtype == torch.float16:
        patterns += list(model._keep_in_fp32_modules or [])
    return re.compile("|".join(patterns)) if patterns else None


def _memory_name(disk_name: str, family: HFFamily) -> str:
    for old, new in family.disk_renames:
        disk_name = disk_name.replace(old, new)
    return disk_name


def _dense_state(model: PreTrainedModel, reader: CheckpointReader, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The checkpoint's dense tensors under in-memory names, each in the dtype transformers would give it."""
    targets = model.state_dict()
    fp32 = _keep_in_fp32(model, dtype)
    ignored = [re.compile(p) for p in model._keys_to_ignore_on_load_unexpected or []]
    state, unexpected = {}, []
    for disk_name, tensor in reader.dense_state_dict().items():
        name = _memory_name(disk_name, reader.family)
        if name in targets:
            if tensor.shape != targets[name].shape:  # load_state_dict would raise a page of size mismatches
                raise ConfigError(f"checkpoint tensor {disk_name} has shape {list(tensor.shape)}, but config.json "
                                  f"makes it {list(targets[name].shape)}; is config.json from the same checkpoint?")
            state[name] = tensor.to(torch.float32 if fp32 and fp32.search(name) else targets[name].dtype)
        elif not any(p.search(name) for p in ignored):
            unexpected.append(disk_name)
    if unexpected:
        raise ConfigError(f"{type(model).__name__} has no place for checkpoint tensors {unexpected[:5]} "
                          f"({len(unexpected)} in all); is config.json from the same checkpoint?")
    return state


def _load_dense(model: PreTrainedModel, reader: CheckpointReader, dtype: torch.dtype, emptied: set[str]) -> None:
    result = model.load_state_dict(_dense_state(model, reader, dtype), strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        missing = sorted(set(result.missing_keys) - emptied)
        raise ConfigError(f"checkpoint {reader.model_dir} lacks {still_meta[:5]} (missing: {missing[:5]})")


def load_remote_model(
    model_dir: str | Path, backend: ExpertBackend, dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """The ordinary transformers causal-LM of the checkpoint in `model_dir`, routed experts run by `backend`.

    dtype: defaults to the checkpoint's (as from_pretrained's "auto"). Only dense tensors are read; the
    experts' parameters are empty (numel 0), so the model must not be saved. ConfigError if the
    checkpoint is not a supported MoE family or does not fit its config.
    """
    reader = CheckpointReader(model_dir)
    dtype = dtype or reader.family.dtype
    config = AutoConfig.from_pretrained(model_dir)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation=EXPERTS_IMPLEMENTATION)
    emptied = _attach_backend(model, reader.family, backend)
    _load_dense(model, reader, dtype, emptied)
    if (Path(model_dir) / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    model.config.name_or_path = str(model_dir)
    logger.info("loaded %s from %s with %d MoE layers on a remote backend",
                type(model).__name__, model_dir, len(reader.family.moe_layers))
    return model.eval()

