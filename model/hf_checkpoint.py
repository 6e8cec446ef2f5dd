"""Read a local Hugging Face MoE checkpoint (safetensors) without loading it: its family facts from
config.json, one routed expert at a time (memory-mapped, only that expert's bytes), or every dense tensor.

Families: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, GPT-OSS (as transformers 5.23 has them).
Shapes: E experts per layer, H hidden size, F expert hidden size. Needs no transformers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from moeswarm.model.model_dir import open_safetensors
from moeswarm.protocol.errors import ConfigError

logger = logging.getLogger(__name__)

Layout = Literal["per_expert", "fused"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HEADER_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_REDO = "download or copy the checkpoint again"  # what fixes a missing or truncated file


@dataclass(frozen=True, kw_only=True)
class HFFamily:
    """What the importer needs to know about one checkpoint, from its config.json."""

    model_type: str  # config.json "model_type", e.g. "mixtral"
    expert_kind: Literal["swiglu", "gpt_oss"]  # which expert module computes a routed expert
    hidden_size: int  # H
    expert_intermediate_size: int  # F of one routed expert
    num_experts: int  # E routed experts in every MoE layer
    top_k: int  # experts per token
    num_layers: int  # decoder layers, dense ones included
    moe_layers: tuple[int, ...]  # layers whose MLP is a routed MoE block
    dtype: torch.dtype  # dtype the checkpoint is stored and loaded in
    # One tensor per expert (save_pretrained's default): gate, up, down names with {layer} and {expert};
    # None where the family is only ever stored fused (GPT-OSS).
    per_expert_names: tuple[str, str, str] | None
    # The experts module in memory; fused on-disk tensors are named after it (".gate_up_proj", ...).
    experts_module: str = "model.layers.{layer}.mlp.experts"
    # Fused gate_up layout. False: gate_up [E,2F,H] = cat(gate, up), down [E,H,F].
    # True (GPT-OSS): gate_up [E,H,2F] transposed with gate/up interleaved, down [E,F,H], plus biases.
    fused_interleaved: bool = False
    disk_renames: tuple[tuple[str, str], ...] = ()  # on-disk -> in-memory substrings of dense names
    swiglu_limit: float | None = None  # GPT-OSS clamp limit
    swiglu_alpha: float | None = None  # GPT-OSS sigmoid scale

    def expert_params(self) -> dict[str, float]:
        """Keyword arguments of `hf_experts.expert_from_weights` for this family's experts."""
        if self.expert_kind == "gpt_oss":
            return {"limit": self.swiglu_limit, "alpha": self.swiglu_alpha}
        return {}

    def check_experts(self, pairs: Iterable[tuple[int, int]]) -> None:
        """Raise ConfigError naming what exists if any (layer, expert) is not a routed expert here."""
        for layer, expert in pairs:
            if layer not in self.moe_layers:
                layers = format_ranges(self.moe_layers)
                raise ConfigError(f"layer {layer} is not an MoE layer of this checkpoint (MoE layers: {layers})")
            if not 0 <= expert < self.num_experts:
                raise ConfigError(
                    f"expert {expert} does not exist "
                    f"(checkpoint has {self.num_experts} experts per layer, 0-{self.num_experts - 1})"
                )


@dataclass(frozen=True, kw_only=True)
class ExpertWeights:
    """One routed expert, in the checkpoint dtype, contiguous and owning its memory."""

    gate: torch.Tensor  # [F, H]
    up: torch.Tensor  # [F, H]
    down: torch.Tensor  # [H, F]
    gate_bias: torch.Tensor | None = None  # [F]  (GPT-OSS)
    up_bias: torch.Tensor | None = None  # [F]
    down_bias: torch.Tensor | None = None  # [H]

    def to(self, dtype: torch.dtype) -> ExpertWeights:
        """The same expert in `dtype` (a node serving bf16 from an fp32 checkpoint)."""
        cast = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return ExpertWeights(**{name: None if t is None else t.to(dtype) for name, t in cast.items()})


def format_ranges(values: Iterable[int]) -> str:
    """(0, 1, 2, 5) -> "0-2, 5"."""
    runs: list[list[int]] = []
    for v in sorted(set(values)):
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


# ---- family detection ------------------------------------------------------------------------

# gate, up, down of one expert in the one-tensor-per-expert layout
_QWEN_NAMES = tuple(f"model.layers.{{layer}}.mlp.experts.{{expert}}.{p}_proj.weight" for p in ("gate", "up", "down"))
_MIXTRAL_NAMES = tuple(f"model.layers.{{layer}}.block_sparse_moe.experts.{{expert}}.{w}.weight" for w in ("w1", "w3", "w2"))


def _require(config: dict[str, Any], *keys: str) -> int:
    """The first of `keys` config.json sets: a positive integer (sizes and counts), else ConfigError."""
    for key in keys:
        value = config.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"config.json {key}={value!r}: must be a positive integer")
            return value
    raise ConfigError(f"config.json of this {config['model_type']} checkpoint lacks {' or '.join(map(repr, keys))}")


def _moe_layers(config: dict[str, Any], num_layers: int) -> tuple[int, ...]:
    model_type = config["model_type"]
    if model_type == "deepseek_v3":
        first_dense = config.get("first_k_dense_replace", 3)  # transformers' default
        return tuple(range(first_dense, num_layers))
    if model_type in ("qwen2_moe", "qwen3_moe"):
        dense = set(config.get("mlp_only_layers") or ())
        step = config.get("decoder_sparse_step", 1)
        return tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)
    return tuple(range(num_layers))


def _config_dtype(config: dict[str, Any]) -> torch.dtype | None:
    name = config.get("dtype") or config.get("torch_dtype")
    if name is None:
        return None
    if name not in _DTYPES:
        raise ConfigError(f"config.json dtype {name!r} is not supported (use one of {', '.join(_DTYPES)})")
    return _DTYPES[name]


def detect_family(config: dict[str, Any]) -> HFFamily:
    """Family facts from a parsed config.json; ConfigError for an unsupported or quantized checkpoint.

    Where config.json has no dtype, `dtype` is float32 here (CheckpointReader reads it from the weights).
    """
    model_type = config.get("model_type")
    if model_type not in _EXPERTS_KEYS:
        raise ConfigError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(_EXPERTS_KEYS))}"
        )
    if config.get("quantization_config"):
        quantization = config["quantization_config"]
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else quantization
        raise ConfigError(f"quantized checkpoints ({method}) are not supported; dequantize to bf16/fp32 first")
    gpt_oss = model_type == "gpt_oss"
    if not gpt_oss and config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {config['hidden_act']!r} is not supported (SwiGLU experts need 'silu')")
    num_layers = _require(config, "num_hidden_layers")
    intermediate_key = "intermediate_size" if model_type in ("mixtral", "olmoe", "gpt_oss") else "moe_intermediate_size"
    hidden_size, expert_intermediate_size = _require(config, "hidden_size"), _require(config, intermediate_key)
    num_experts = _require(config, *_EXPERTS_KEYS[model_type])
    top_k = _require(config, "num_experts_per_tok", "experts_per_token")
    if top_k > num_experts:  # else every node starts, and the client's router fails on its first token
        raise ConfigError(f"config.json routes each token to {top_k} experts, but a layer has only {num_experts}")
    return HFFamily(
        model_type=model_type,
        expert_kind="gpt_oss" if gpt_oss else "swiglu",
        hidden_size=hidden_size,
        expert_intermediate_size=expert_intermediate_size,
        num_experts=num_experts,
        top_k=top_k,
        num_layers=num_layers,
        moe_layers=_moe_layers(config, num_layers),
        dtype=_config_dtype(config) or torch.float32,
        per_expert_names=None if gpt_oss else _MIXTRAL_NAMES if model_type == "mixtral" else _QWEN_NAMES,
        fused_interleaved=gpt_oss,
        disk_renames=((".block_sparse_moe.", ".mlp."),) if model_type == "mixtral" else (),
        swiglu_limit=config.get("swiglu_limit", 7.0) if gpt_oss else None,
        swiglu_alpha=config.get("swiglu_alpha", 1.702) if gpt_oss else None,
    )


# config.json keys that give the number of routed experts, per supported model_type
_EXPERTS_KEYS: dict[str, tuple[str, ...]] = {
    "mixtral": ("num_local_experts",),
    "qwen2_moe": ("num_experts",),
    "qwen3_moe": ("num_experts", "num_local_experts"),
    "olmoe": ("num_experts",),
    "deepseek_v3": ("n_routed_experts",),
    "gpt_oss": ("num_local_experts", "num_experts"),
}


# ---- expert spec -----------------------------------------------------------------------------

_SPEC_SYNTAX = 'write e.g. "all", "layers 0-3, experts 0-7" or "layers 1,3 experts 0-3"'
_SPEC_RE = re.compile(r"^\s*layers\s+(?P<layers>.+?)\s*,?\s+experts\s+(?P<experts>.+?)\s*$", re.IGNORECASE)
_ITEM_RE = re.compile(r"^(\d+)(?:\s*-\s*(\d+))?$")


def _parse_ranges(text: str, everything: Iterable[int], spec: str) -> list[int]:
    everything = list(everything)
    if text.strip().lower() == "all":
        return everything
    # A range ends at the first value past the largest existing one: that value is enough for
    # check_experts to name, and a typo like "0-70000000000" must not expand into billions of ints.
    past_last = max(everything, default=-1) + 1
    values: list[int] = []
    for item in text.split(","):
        match = _ITEM_RE.match(item.strip())
        if match is None or (match[2] is not None and int(match[2]) < int(match[1])):
            raise ConfigError(f"bad range {item.strip()!r} in expert spec {spec!r}; {_SPEC_SYNTAX}")
        first = int(match[1])
        values.extend(range(first, max(first, min(int(match[2] or match[1]), past_last)) + 1))
    return values


def parse_expert_spec(text: str, family: HFFamily) -> list[tuple[int, int]]:
    """Sorted (layer, expert) pairs named by `text`; ConfigError for bad syntax or experts that don't exist.

    Syntax: "all" (every routed expert), or "layers L, experts E" where L and E are comma-separated
    numbers, inclusive ranges "a-b", or "all".
    """
    if text.strip().lower() == "all":
        return [(layer, e) for layer in family.moe_layers for e in range(family.num_experts)]
    match = _SPEC_RE.match(text)
    if match is None:
        raise ConfigError(f"cannot parse expert spec {text!r}; {_SPEC_SYNTAX}")
    layers = _parse_ranges(match["layers"], family.moe_layers, text)
    experts = _parse_ranges(match["experts"], range(family.num_experts), text)
    pairs = sorted({(layer, e) for layer in layers for e in experts})
    family.check_experts(pairs)
    return pairs


# ---- reader ----------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{path} not found; point at a Hugging Face checkpoint folder") from e
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _tensor_files(model_dir: Path) -> dict[str, str]:
    """Tensor name -> safetensors file name, from the shard index or the single model.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConfigError(f"{index} has no 'weight_map' object (tensor name -> file)")
        return dict(weight_map)
    single = model_dir / "model.safetensors"
    if not single.exists():
        raise ConfigError(f"{model_dir} has neither model.safetensors nor model.safetensors.index.json")
    with open_safetensors(single, _REDO) as f:
        return dict.fromkeys(f.keys(), single.name)


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy that owns its memory (never a view of a memory-mapped file or a bigger tensor)."""
    return tensor.clone(memory_format=torch.contiguous_format)


class CheckpointReader:
    """Lazy, memory-mapped access to one local checkpoint; opens each shard file on first use."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self.config = _read_json(self.model_dir / "config.json")
        self._file_of = _tensor_files(self.model_dir)
        self._handles: dict[str, Any] = {}
        family = detect_family(self.config)
        self.layout: Layout = self._detect_layout(family)
        if _config_dtype(self.config) is None:  # old configs: take the dtype of the weights
            family = dataclasses.replace(family, dtype=self._header_dtype(self._expert_names(family, self.layout)[0]))
        self.family = family
        self._expert_re = self._expert_pattern()
        logger.debug(  # every open: a client opens a checkpoint more than once
            "checkpoint %s: %s, %s layout, %s experts x MoE layers %s",
            self.model_dir, family.model_type, self.layout, family.num_experts, format_ranges(family.moe_layers),
        )

    # -- names --
    @staticmethod
    def _expert_names(family: HFFamily, layout: Layout) -> list[str]:
        """Names of the first MoE layer's expert-0 tensors in `layout` (used to recognise the layout)."""
        layer = family.moe_layers[0] if family.moe_layers else 0
        if layout == "per_expert":
            return [n.format(layer=layer, expert=0) for n in family.per_expert_names or ()]
        prefix = family.experts_module.format(layer=layer)
        return [f"{prefix}.gate_up_proj", f"{prefix}.down_proj"]

    def _detect_layout(self, family: HFFamily) -> Layout:
        for layout in ("per_expert", "fused"):
            names = self._expert_names(family, layout)
            if names and all(n in self._file_of for n in names):
                return layout
        if not family.moe_layers:
            raise ConfigError(f"{family.model_type} checkpoint {self.model_dir} has no MoE layer")
        candidates = [self._expert_names(family, layout) for layout in ("per_expert", "fused")]
        expected = " or ".join(repr(names[0]) for names in candidates if names)
        found = sorted(n for n in self._file_of if ".experts." in n)[:3]
        raise ConfigError(f"no expert tensors in {self.model_dir}: expected {expected}; found {found or 'none'}")

    def _expert_pattern(self) -> re.Pattern[str]:
        family = self.family
        module = re.escape(family.experts_module).replace(r"\{layer\}", r"\d+")
        patterns = [module + r"\.(gate_up_proj|down_proj)(_bias)?"]
        for name in family.per_expert_names or ():
            patterns.append(re.escape(name).replace(r"\{layer\}", r"\d+").replace(r"\{expert\}", r"\d+"))
        return re.compile("|".join(f"(?:{p})" for p in patterns))

    def is_expert_tensor(self, name: str) -> bool:
        """Whether the on-disk tensor `name` holds routed-expert weights (any layout)."""
        return self._expert_re.fullmatch(name) is not None

    # -- file access --
    def _handle(self, name: str) -> Any:
        if name not in self._file_of:
            raise ConfigError(f"tensor {name!r} is not in checkpoint {self.model_dir}")
        file = self._file_of[name]
        if file not in self._handles:
            self._handles[file] = open_safetensors(self.model_dir / file, _REDO)  # memory-mapped
        return self._handles[file]

    def _header_dtype(self, name: str) -> torch.dtype:
        code = self._handle(name).get_slice(name).get_dtype()
        if code not in _HEADER_DTYPES:
            raise ConfigError(f"tensor {name!r} has dtype {code}; supported: {', '.join(_HEADER_DTYPES)}")
        return _HEADER_DTYPES[code]

    def _tensor(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def _expert_slice(self, name: str, expert: int) -> torch.Tensor:
        """Row `expert` of a fused [E, ...] tensor; only that row is read from the file."""
        return self._handle(name).get_slice(name)[expert]

    # -- public --
    def check_experts(self, pairs: Iterable[tuple[int, int]]) -> None:
        """Raise ConfigError naming what the checkpoint has if any (layer, expert) is not in it."""
        self.family.check_experts(pairs)

    def read_expert(self, layer: int, expert: int) -> ExpertWeights:
        """The weights of routed expert `expert` of `layer`, in `family.dtype`; ConfigError if it does not exist."""
        self.check_experts([(layer, expert)])
        if self.layout == "per_expert":
            gate, up, down = (self._tensor(n.format(layer=layer, expert=expert)) for n in self.family.per_expert_names)
            weights = ExpertWeights(gate=_owned(gate), up=_owned(up), down=_owned(down))
        elif self.family.fused_interleaved:
            weights = self._read_interleaved(layer, expert)
        else:
            prefix = self.family.experts_module.format(layer=layer)
            gate_up = self._expert_slice(f"{prefix}.gate_up_proj", expert)  # [2F, H] = cat(gate, up)
            gate, up = gate_up.chunk(2, dim=0)
            down = self._expert_slice(f"{prefix}.down_proj", expert)  # [H, F]
            weights = ExpertWeights(gate=_owned(gate), up=_owned(up), down=_owned(down))
        self._check_shapes(weights, layer, expert)
        # transformers loads every weight in config.json's dtype, whatever the file stores (fp32 files
        # under "bfloat16", say); an expert kept in its file's dtype would compute other values.
        return weights if weights.gate.dtype == self.family.dtype else weights.to(self.family.dtype)

    def _read_interleaved(self, layer: int, expert: int) -> ExpertWeights:
        """GPT-OSS: gate_up [H, 2F] with gate in even and up in odd columns; down [F, H]; biases."""
        prefix = self.family.experts_module.format(layer=layer)
        gate_up = self._expert_slice(f"{prefix}.gate_up_proj", expert)  # [H, 2F]
        gate_up_bias = self._expert_slice(f"{prefix}.gate_up_proj_bias", expert)  # [2F]
        down = self._expert_slice(f"{prefix}.down_proj", expert)  # [F, H]
        return ExpertWeights(
            gate=_owned(gate_up[:, ::2].T),
            up=_owned(gate_up[:, 1::2].T),
            down=_owned(down.T),
            gate_bias=_owned(gate_up_bias[::2]),
            up_bias=_owned(gate_up_bias[1::2]),
            down_bias=_owned(self._expert_slice(f"{prefix}.down_proj_bias", expert)),
        )

    def _check_shapes(self, w: ExpertWeights, layer: int, expert: int) -> None:
        f, h = self.family.expert_intermediate_size, self.family.hidden_size
        got = (tuple(w.gate.shape), tuple(w.up.shape), tuple(w.down.shape))
        if got != ((f, h), (f, h), (h, f)):
            raise ConfigError(
                f"expert {expert} of layer {layer} has gate/up/down shapes {got}; config.json says "
                f"F={f}, H={h}, so expected {((f, h), (f, h), (h, f))}"
            )

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor that is not a routed-expert tensor, named as on disk, in the checkpoint dtype."""
        return {name: _owned(self._tensor(name)) for name in self._file_of if not self.is_expert_tensor(name)}

    def tensor_names(self) -> list[str]:
        """All tensor names of the checkpoint, as on disk."""
        return list(self._file_of)

    def close(self) -> None:
        """Drop the open file handles (and their memory maps); later reads reopen them."""
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
