"""model/hf_checkpoint.py (family facts, expert reads in both layouts, specs) and model/hf_experts.py
(expert modules), checked against the in-memory transformers model of tiny saved checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from hf_tiny import FAMILIES, one_torch_thread, save_tiny  # noqa: E402
from transformers.integrations.moe import grouped_mm_experts_forward  # noqa: E402

from moeswarm.model.experts import expert_backward  # noqa: E402
from moeswarm.model.hf_checkpoint import CheckpointReader, detect_family, parse_expert_spec  # noqa: E402
from moeswarm.model.hf_experts import GptOssExpert, expert_from_weights, hf_expert_forward  # noqa: E402
from moeswarm.protocol.errors import ConfigError  # noqa: E402

LAYOUTS = ("per_expert", "fused")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(family, layout, shards) -> (checkpoint dir, the transformers model that was saved), built once."""
    cache: dict[tuple, tuple] = {}

    def get(family: str, layout: str = "per_expert", shards: int = 1):
        key = (family, layout, shards)
        if key not in cache:
            directory = tmp_path_factory.mktemp(f"{family}-{layout}-{shards}")
            cache[key] = directory, save_tiny(family, directory, layout=layout, shards=shards)
        return cache[key]

    return get


def _experts_in_memory(model, family, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """One expert's weights, sliced from transformers' fused parameters as its modeling code reads them."""
    experts = model.get_submodule(family.experts_module.format(layer=layer))
    if family.expert_kind == "gpt_oss":  # gate_up [H, 2F]: gate in even, up in odd columns
        gate_up, bias = experts.gate_up_proj[expert], experts.gate_up_proj_bias[expert]
        return dict(gate=gate_up[:, ::2].T, up=gate_up[:, 1::2].T, down=experts.down_proj[expert].T,
                    gate_bias=bias[::2], up_bias=bias[1::2], down_bias=experts.down_proj_bias[expert])
    gate, up = experts.gate_up_proj[expert].chunk(2, dim=0)  # [2F, H] = cat(gate, up), as _default_apply_gate
    return dict(gate=gate, up=up, down=experts.down_proj[expert])


@pytest.mark.parametrize("family_name", FAMILIES)
def test_detect_family_agrees_with_transformers(saved, family_name):
    directory, model = saved(family_name)
    family = detect_family(json.loads((directory / "config.json").read_text()))
    moe_layers = tuple(i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts"))
    experts = model.get_submodule(family.experts_module.format(layer=moe_layers[0]))
    assert family.moe_layers == moe_layers
    assert family.num_experts == experts.num_experts == 8
    assert family.hidden_size == 64 and family.top_k == 2 and family.dtype == torch.float32
    assert experts.down_proj.shape[1:] in {(64, family.expert_intermediate_size), (family.expert_intermediate_size, 64)}
    assert family.expert_kind == ("gpt_oss" if family_name == "gpt_oss" else "swiglu")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family_name", FAMILIES)
def test_read_expert_equals_model_weights(saved, family_name, layout):
    directory, model = saved(family_name, layout)
    reader = CheckpointReader(directory)
    assert reader.layout == ("fused" if family_name == "gpt_oss" else layout)  # GPT-OSS is always fused on disk
    for layer in reader.family.moe_layers:
        for expert in range(reader.family.num_experts):
            weights = reader.read_expert(layer, expert)
            for name, expected in _experts_in_memory(model, reader.family, layer, expert).items():
                got = getattr(weights, name)
                assert torch.equal(got, expected), (layer, expert, name)
                assert got.is_contiguous() and got.dtype == torch.float32
                assert got.untyped_storage().nbytes() == got.numel() * got.element_size()  # owns exactly itself


@pytest.mark.parametrize("family_name", FAMILIES)
def test_expert_module_output_equals_transformers_experts(saved, family_name):
    """Read weights -> node expert module -> output, against transformers' own experts forward."""
    directory, model = saved(family_name)
    reader = CheckpointReader(directory)
    x_NH = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    for layer in reader.family.moe_layers:
        experts = model.get_submodule(reader.family.experts_module.format(layer=layer))
        for expert in (0, 5):
            module = expert_from_weights(reader.family.expert_kind, reader.read_expert(layer, expert),
                                         **reader.family.expert_params())
            ids_NK, weights_NK = torch.full((8, 1), expert), torch.ones(8, 1)
            with torch.no_grad():
                expected = grouped_mm_experts_forward(experts, x_NH, ids_NK, weights_NK)
            assert torch.equal(hf_expert_forward(module, x_NH), expected), (layer, expert)


def test_gpt_oss_expert_clamps_and_backpropagates_like_transformers(saved):
    directory, model = saved("gpt_oss")
    reader = CheckpointReader(directory)
    experts = model.model.layers[1].mlp.experts
    expert = expert_from_weights("gpt_oss", reader.read_expert(1, 2), **reader.family.expert_params())
    assert isinstance(expert, GptOssExpert) and expert.limit == 0.5 and expert.alpha == pytest.approx(1.702)
    x_NH = torch.randn(6, 64, generator=torch.Generator().manual_seed(4)) * 4
    grad_NH = torch.randn(6, 64, generator=torch.Generator().manual_seed(5))

    x_ref = x_NH.clone().requires_grad_(True)
    grouped_mm_experts_forward(experts, x_ref, torch.full((6, 1), 2), torch.ones(6, 1)).backward(grad_NH)
    grad_x = expert_backward(expert, x_NH, grad_NH)
    torch.testing.assert_close(grad_x, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(expert.gate.weight.grad, experts.gate_up_proj.grad[2][:, ::2].T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(expert.down.bias.grad, experts.down_proj_bias.grad[2], rtol=1e-5, atol=1e-6)

    unclamped = expert_from_weights("gpt_oss", reader.read_expert(1, 2), limit=1e9, alpha=1.702)
    assert not torch.allclose(hf_expert_forward(unclamped, x_NH), hf_expert_forward(expert, x_NH))  # clamps bite


@pytest.mark.parametrize(("family_name", "layout"), [("mixtral", "per_expert"), ("gpt_oss", "fused")])
def test_sharded_checkpoint_reads_experts_across_files(saved, family_name, layout):
    directory, model = saved(family_name, layout, shards=8)
    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    reader = CheckpointReader(directory)
    layer_files = {f for name, f in weight_map.items() if reader.is_expert_tensor(name) and ".layers.0." in name}
    if layout == "per_expert":
        assert len(layer_files) > 1, "layer 0's experts should span several shard files"
    assert len(set(weight_map.values())) > 2
    for layer in reader.family.moe_layers:
        for expert in range(8):
            weights = reader.read_expert(layer, expert)
            for name, expected in _experts_in_memory(model, reader.family, layer, expert).items():
                assert torch.equal(getattr(weights, name), expected), (layer, expert, name)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family_name", ["mixtral", "deepseek_v3"])
def test_dense_state_dict_has_everything_but_routed_experts(saved, family_name, layout):
    directory, model = saved(family_name, layout)
    reader = CheckpointReader(directory)
    dense = reader.dense_state_dict()
    expert_names = [n for n in reader.tensor_names() if reader.is_expert_tensor(n)]
    assert expert_names and not any(".experts." in name for name in dense)
    assert len(dense) + len(expert_names) == len(reader.tensor_names())
    memory = {n: t for n, t in model.state_dict().items() if ".experts." not in n}
    renamed = {n.replace(".block_sparse_moe.", ".mlp."): t for n, t in dense.items()}
    assert renamed.keys() == memory.keys()
    assert all(torch.equal(renamed[n], memory[n]) for n in memory)


def test_check_experts_names_what_exists(saved):
    reader = CheckpointReader(saved("deepseek_v3")[0])
    reader.check_experts([(1, 0), (2, 7)])
    with pytest.raises(ConfigError, match=r"layer 0 is not an MoE layer of this checkpoint \(MoE layers: 1-2\)"):
        reader.check_experts([(1, 0), (0, 3)])
    with pytest.raises(ConfigError, match=r"layer 7 is not an MoE layer .*MoE layers: 1-2"):
        reader.read_expert(7, 0)
    with pytest.raises(ConfigError, match=r"expert 9 does not exist \(checkpoint has 8 experts per layer"):
        reader.read_expert(1, 9)
    qwen3 = CheckpointReader(saved("qwen3_moe")[0]).family
    with pytest.raises(ConfigError, match=r"MoE layers: 0, 2\)"):
        qwen3.check_experts([(1, 0)])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("all", [(layer, e) for layer in (1, 2) for e in range(8)]),
        ("layers 1-2, experts 0-1", [(1, 0), (1, 1), (2, 0), (2, 1)]),
        ("layers 2,1 experts 7, 0-1", [(1, 0), (1, 1), (1, 7), (2, 0), (2, 1), (2, 7)]),
        ("  LAYERS 2 EXPERTS all ", [(2, e) for e in range(8)]),
        ("layers all, experts 3", [(1, 3), (2, 3)]),
    ],
)
def test_parse_expert_spec(saved, text, expected):
    family = CheckpointReader(saved("deepseek_v3")[0]).family
    assert parse_expert_spec(text, family) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "cannot parse expert spec"),
        ("layers 1-2", "cannot parse expert spec"),
        ("experts 0-3", "cannot parse expert spec"),
        ("layers 2-1, experts 0", "bad range '2-1'"),
        ("layers x, experts 0", "bad range 'x'"),
        ("layers 1,, experts 0", "bad range ''"),
        ("layers 0-1, experts 0", "layer 0 is not an MoE layer"),
        ("layers 1, experts 6-8", "expert 8 does not exist"),
    ],
)
def test_parse_expert_spec_rejects_bad_text_with_an_example(saved, text, message):
    family = CheckpointReader(saved("deepseek_v3")[0]).family
    with pytest.raises(ConfigError, match=message) as info:
        parse_expert_spec(text, family)
    if "parse" in message or "range" in message:
        assert '"layers 0-3, experts 0-7"' in str(info.value)


def test_parse_expert_spec_does_not_expand_a_range_past_the_last_expert(saved):
    """A typo such as "experts 0-70000000000" is refused like "experts 0-8", without listing every
    number in it (that ran the node out of memory)."""
    import tracemalloc

    family = CheckpointReader(saved("deepseek_v3")[0]).family
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match="expert 8 does not exist"):
            parse_expert_spec("layers 1, experts 0-1000000", family)
        with pytest.raises(ConfigError, match="layer 3 is not an MoE layer"):
            parse_expert_spec("layers 1-1000000, experts 0", family)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak  # listing a million (layer, expert) pairs takes over 100 MB
    with pytest.raises(ConfigError, match="expert 70000000000 does not exist"):
        parse_expert_spec("layers 1, experts 70000000000-80000000000", family)


def test_detect_family_rejects_unsupported_and_quantized_configs():
    with pytest.raises(ConfigError, match=r"'llama' is not supported; supported: deepseek_v3, gpt_oss, mixtral"):
        detect_family({"model_type": "llama"})
    with pytest.raises(ConfigError, match="quantized checkpoints \\(mxfp4\\) are not supported"):
        detect_family({"model_type": "gpt_oss", "quantization_config": {"quant_method": "mxfp4"}})
    with pytest.raises(ConfigError, match="lacks 'num_local_experts'"):
        detect_family({"model_type": "mixtral", "hidden_size": 8, "num_hidden_layers": 1, "intermediate_size": 4})


def test_reader_errors_say_what_is_missing(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        CheckpointReader(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(ConfigError, match="neither model.safetensors nor model.safetensors.index.json"):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize("value", ["eight", 0, 2.5, True])
def test_detect_family_rejects_counts_that_are_not_positive_integers(value):
    config = {"model_type": "mixtral", "hidden_size": 8, "num_hidden_layers": 1, "intermediate_size": 4,
              "num_experts_per_tok": 1, "num_local_experts": value}
    with pytest.raises(ConfigError, match=f"config.json num_local_experts={value!r}: must be a positive integer"):
        detect_family(config)


def test_a_truncated_safetensors_file_is_a_config_error_naming_it(saved, tmp_path):
    source, _ = saved("mixtral")
    (tmp_path / "config.json").write_bytes((source / "config.json").read_bytes())
    (tmp_path / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes()[:100_000])
    with pytest.raises(ConfigError, match="model.safetensors is not a complete safetensors file"):
        CheckpointReader(tmp_path)
