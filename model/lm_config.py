"""Configuration of the MoE language model (model/transformer.py): sizes, layer pattern, routing."""

from __future__ import annotations

import dataclasses

from moeswarm.model.routing import RoutingConfig
from moeswarm.protocol.errors import ConfigError
from moeswarm.protocol.spec import ModelSpec, format_uid


def _require(condition: bool, key: str, value: object, rule: str) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r}: {rule}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoELMConfig:
    name: str = "tiny-moe"  # model name: part of every expert UID ({name}.L{layer}.E{expert})
    vocab_size: int = 258  # the byte tokenizer's 256 bytes + BOS + EOS
    d_model: int = 256  # hidden size D
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # attention heads
    n_kv_heads: int | None = None  # grouped-query attention: key/value heads (None: n_heads)
    d_ff: int = 512  # hidden size F of each expert (SwiGLU)
    d_ff_dense: int = 1024  # hidden size of the dense FFN of layers without experts
    first_dense: int = 0  # the first layers use a dense FFN (DeepSeek's first_k_dense_replace)
    moe_every: int = 1  # after them, every n-th layer has experts (GShard / Switch used 2)
    routing: RoutingConfig = RoutingConfig(n_experts=8, k=2)  # routing mode, experts per layer, k, ...
    shared_experts_local: bool = True  # shared experts run on the client (False: they are hosted on nodes)
    min_experts: int = 1  # a token may lose experts whose replicas all failed while it keeps this many
    max_seq_len: int = 2048  # longest prompt + generation (size of the rotary table and KV cache)
    rope_theta: float = 10000.0  # rotary base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = True  # the output head shares the embedding matrix
    seed: int = 0  # deterministic init: dense weights from it, each expert from (seed, uid)

    def __post_init__(self) -> None:
        for key in ("vocab_size", "n_layers", "n_heads", "d_ff_dense", "moe_every", "max_seq_len"):
            value = getattr(self, key)
            _require(isinstance(value, int) and value >= 1, key, value, "must be an integer >= 1")
        kv_heads = self.kv_heads
        _require(self.d_model % self.n_heads == 0, "n_heads", self.n_heads, f"must divide d_model={self.d_model}")
        _require((self.d_model // self.n_heads) % 2 == 0, "n_heads", self.n_heads, "head size must be even (rotary)")
        _require(1 <= kv_heads and self.n_heads % kv_heads == 0, "n_kv_heads", self.n_kv_heads, "must divide n_heads")
        _require(0 <= self.first_dense < self.n_layers, "first_dense", self.first_dense, "must leave at least one MoE layer")
        slots = self.slots_per_token()
        _require(1 <= self.min_experts <= slots, "min_experts", self.min_experts, f"must be in [1, {slots}] (experts per token)")
        _require(self.rope_theta > 0 and self.norm_eps > 0, "rope_theta/norm_eps", (self.rope_theta, self.norm_eps), "> 0")
        self.spec()  # validates the name and the expert dimensions

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def slots_per_token(self) -> int:
        """Experts each token is sent to (routed + shared), whatever the routing mode."""
        r = self.routing
        routed = {"soft": r.n_experts, "hierarchical": r.k_groups * r.k}.get(r.mode, r.k)
        return routed + r.n_shared

    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.first_dense, self.n_layers) if (i - self.first_dense) % self.moe_every == 0)

    def spec(self) -> ModelSpec:
        """The expert dimensions nodes must agree on (shared experts count as experts of the layer)."""
        n_total = self.routing.n_experts + self.routing.n_shared
        return ModelSpec(
            name=self.name, d_model=self.d_model, d_ff=self.d_ff, n_layers=self.n_layers, n_experts=n_total,
            moe_layers=self.moe_layers(),
        )

    def remote_uids(self) -> list[str]:
        """The experts nodes host: every routed one, and the shared ones unless they run locally."""
        per_layer = self.routing.n_experts + (0 if self.shared_experts_local else self.routing.n_shared)
        return [format_uid(self.name, layer, e) for layer in self.moe_layers() for e in range(per_layer)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
