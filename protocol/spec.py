"""Model specs and expert UIDs: what an expert is called and which shapes it must have."""

from __future__ import annotations

import bisect
import dataclasses
import re

from moeswarm.protocol.errors import BadRequest, ConfigError

# A model name is a DNS-label-like token; it is part of every UID and DHT key.
_MODEL_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # used with fullmatch: "$" would allow "\n"
# Canonical numbers only (no leading zeros): UIDs are compared as strings in the DHT and the node.
_UID_RE = re.compile(r"(?P<model>[a-z0-9][a-z0-9_-]{0,63})\.L(?P<layer>0|[1-9]\d{0,4})\.E(?P<expert>0|[1-9]\d{0,5})")
MAX_UID_CHARS = 96
EXPERT_KINDS = ("swiglu", "gpt_oss")
# Bounds on a spec, whether from a config or from a peer's record: a reader lists a model's experts
# (`moeswarm status`), so an announced spec must not make it list 10^12. Real models fit with room:
# DeepSeek-V3 has 58 MoE layers x 256 experts (14,848), Qwen3-235B 94 x 128 (12,032).
MAX_WIDTH = 1 << 20  # d_model and d_ff
MAX_LAYERS = 1 << 12  # n_layers
MAX_EXPERTS_PER_MODEL = 1 << 16  # MoE layers x experts per layer


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
        for key, most in (("d_model", MAX_WIDTH), ("d_ff", MAX_WIDTH), ("n_layers", MAX_LAYERS), ("n_experts", MAX_EXPERTS_PER_MODEL)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
                raise ConfigError(f"model.{key}={value!r}: must be an integer in [1, {most}]")
        if self.expert_kind not in EXPERT_KINDS:
            raise ConfigError(f"model.expert_kind={self.expert_kind!r}: one of {', '.join(EXPERT_KINDS)}")
        if self.moe_layers is not None:
            self._check_moe_layers()
        if self.expert_count() > MAX_EXPERTS_PER_MODEL:
            raise ConfigError(
                f"model: {len(self.layers_with_experts())} MoE layers x n_experts={self.n_experts} is "
                f"{self.expert_count()} experts, over the limit of {MAX_EXPERTS_PER_MODEL} per model"
            )

    def _check_moe_layers(self) -> None:
        layers = self.moe_layers
        valid = isinstance(layers, (list, tuple)) and 0 < len(layers) <= self.n_layers  # length first: it may come from a peer
        if valid:
            layers = tuple(layers)
            valid = all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.n_layers for i in layers)
        if not valid or list(layers) != sorted(set(layers)):
            raise ConfigError(
                f"model.moe_layers={str(self.moe_layers)[:80]}: must be a non-empty increasing list of layers below n_layers={self.n_layers}"
            )
        object.__setattr__(self, "moe_layers", layers)

    def to_config(self) -> dict:
        """The spec as a YAML/JSON-ready `model:` mapping (lists, no null keys) for node configs."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_record(cls, model: dict) -> "ModelSpec | None":
        """The spec a node announces in its NodeRecord, or None if it does not parse (newer or broken
        peer) or is over the bounds above (a forged record must not make a reader list its experts)."""
        try:
            return cls(**model)
        except (TypeError, ValueError):
            return None

    def layers_with_experts(self) -> tuple[int, ...]:
        return tuple(range(self.n_layers)) if self.moe_layers is None else self.moe_layers

    def expert_count(self) -> int:
        """How many experts the model has (at most MAX_EXPERTS_PER_MODEL)."""
        return (self.n_layers if self.moe_layers is None else len(self.moe_layers)) * self.n_experts

    def has_expert(self, layer: int, expert: int) -> bool:
        """Whether (layer, expert) is an expert of this model; O(log layers), for checking many UIDs."""
        if not 0 <= expert < self.n_experts:
            return False
        if self.moe_layers is None:
            return 0 <= layer < self.n_layers
        i = bisect.bisect_left(self.moe_layers, layer)
        return i < len(self.moe_layers) and self.moe_layers[i] == layer

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
    if not spec.has_expert(parsed.layer, parsed.expert):
        raise ConfigError(f"expert {uid!r}: layer {parsed.layer} of model {spec.name!r} has no experts (MoE layers: {list(spec.layers_with_experts())})")
    return parsed
