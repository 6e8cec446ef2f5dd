"""Model specs and expert UIDs: what an expert is called and which shapes it must have."""

from __future__ import annotations

import dataclasses
import re

from moeswarm.protocol.errors import BadRequest, ConfigError

# A model name is a DNS-label-like token; it is part of every UID and DHT key.
_MODEL_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # used with fullmatch: "$" would allow "\n"
# Canonical numbers only (no leading zeros): UIDs are compared as strings in the DHT and the node.
_UID_RE = re.compile(r"(?P<model>[a-z0-9][a-z0-9_-]{0,63})\.L(?P<layer>0|[1-9]\d{0,4})\.E(?P<expert>0|[1-9]\d{0,5})")
MAX_UID_CHARS = 96
EXPERT_KINDS = ("swiglu", "gpt_oss")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """The dimensions every expert of one MoE model shares (SwiGLU experts, as in Mixtral)."""

    name: str  # model name, part of each UID, e.g. "tiny-moe"
    d_model: int  # hidden size D: expert input and output width
    d_ff: int  # expert hidden size F
    n_layers: int  # number of layers (transformer blocks); UIDs use the block index
    n_experts: int  # experts per MoE layer (routed + shared)
    moe_layers: tuple[int, ...] | None = None  # the layers that have experts; None: every layer
    expert_kind: str = "swiglu"  # expert FFN: "swiglu" (Mixtral, Qwen, DeepSeek, ...) or "gpt_oss" (biases, clamped)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _MODEL_NAME_RE.fullmatch(self.name):
            raise ConfigError(f"model.name={self.name!r}: use 1-64 chars of [a-z0-9_-], starting with a letter or digit")
        for key in ("d_model", "d_ff", "n_layers", "n_experts"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1 << 20:
                raise ConfigError(f"model.{key}={value!r}: must be an integer in [1, 1048576]")
        if self.expert_kind not in EXPERT_KINDS:
            raise ConfigError(f"model.expert_kind={self.expert_kind!r}: one of {', '.join(EXPERT_KINDS)}")
        if self.moe_layers is not None:
            layers = tuple(self.moe_layers)
            if not layers or list(layers) != sorted(set(layers)) or not all(0 <= i < self.n_layers for i in layers):
                raise ConfigError(
                    f"model.moe_layers={self.moe_layers!r}: must be a non-empty increasing list of layers below n_layers={self.n_layers}"
                )
            object.__setattr__(self, "moe_layers", layers)

    def to_config(self) -> dict:
        """The spec as a YAML/JSON-ready `model:` mapping (lists, no null keys) for node configs."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_record(cls, model: dict) -> "ModelSpec | None":
        """The spec a node announces in its NodeRecord, or None if it does not parse (newer or broken peer)."""
        try:
            return cls(**model)
        except (TypeError, ValueError):
            return None

    def layers_with_experts(self) -> tuple[int, ...]:
        return tuple(range(self.n_layers)) if self.moe_layers is None else self.moe_layers

    def uid(self, layer: int, expert: int) -> str:
        return format_uid(self.name, layer, expert)

    def all_uids(self) -> list[str]:
        return [self.uid(layer, expert) for layer in self.layers_with_experts() for expert in range(self.n_experts)]


@dataclasses.dataclass(frozen=True)
class ExpertUID:
    model: str
    layer: int
    expert: int

    def __str__(self) -> str:
        return format_uid(self.model, self.layer, self.expert)


def format_uid(model: str, layer: int, expert: int) -> str:
    return f"{model}.L{layer}.E{expert}"


def uid_sort_key(uid: str) -> list:
    """Sort key that puts L2 before L10 (works for malformed UIDs too)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", uid)]


def parse_uid(uid: str) -> ExpertUID:
    """Parse `{model}.L{layer}.E{expert}`; raise BadRequest naming the UID when it is malformed."""
    match = _UID_RE.fullmatch(uid) if len(uid) <= MAX_UID_CHARS else None
    if match is None:
        raise BadRequest(f"malformed expert uid {uid[:MAX_UID_CHARS]!r}: expected '{{model}}.L{{layer}}.E{{expert}}'")
    return ExpertUID(match["model"], int(match["layer"]), int(match["expert"]))


def check_uid_in_spec(uid: str, spec: ModelSpec) -> ExpertUID:
    """Parse a UID and check it names an expert that exists in `spec`; raise ConfigError otherwise."""
    try:
        parsed = parse_uid(uid)
    except BadRequest as e:
        raise ConfigError(str(e)) from e
    if parsed.model != spec.name:
        raise ConfigError(f"expert {uid!r} belongs to model {parsed.model!r}, but this node serves {spec.name!r}")
    if parsed.layer >= spec.n_layers or parsed.expert >= spec.n_experts:
        raise ConfigError(
            f"expert {uid!r} is outside model {spec.name!r} "
            f"({spec.n_layers} layers x {spec.n_experts} experts, numbered from 0)"
        )
    if parsed.layer not in spec.layers_with_experts():
        raise ConfigError(f"expert {uid!r}: layer {parsed.layer} of model {spec.name!r} has no experts (MoE layers: {list(spec.layers_with_experts())})")
    return parsed
