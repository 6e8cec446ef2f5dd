"""model/hf_remote.py: the transformers model with its routed experts on a backend gives the same
logits and tokens as the plain transformers model, and never reads or holds routed-expert weights."""

from __future__ import annotations

import pytest
import safetensors
import torch

pytest.importorskip("transformers")

from hf_tiny import FAMILIES, one_torch_thread, save_tiny  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from moeswarm.model.hf_checkpoint import CheckpointReader  # noqa: E402
from moeswarm.model.hf_remote import LocalExpertBackend, load_remote_model  # noqa: E402
from moeswarm.protocol.errors import ConfigError, MoeSwarmError  # noqa: E402

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(family, dtype, layout, shards, overrides) -> checkpoint dir, saved once per module."""
    cache: dict[tuple, object] = {}

    def get(family: str, dtype=torch.float32, layout="per_expert", shards=1, **overrides):
        key = (family, dtype, layout, shards, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = tmp_path_factory.mktemp(family)
            save_tiny(family, cache[key], dtype=dtype, layout=layout, shards=shards, **overrides)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def reference_logits():
    """Logits of the plain transformers model of a checkpoint dir on IDS, computed once per dir."""
    cache: dict[str, torch.Tensor] = {}

    def get(directory) -> torch.Tensor:
        if str(directory) not in cache:
            cache[str(directory)] = _logits(AutoModelForCausalLM.from_pretrained(directory))
        return cache[str(directory)]

    return get


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(IDS).logits


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.dtype == b.dtype
    return (a.float() - b.float()).abs().max().item()


def _remote(directory, dtype=None, backend_dtype=None):
    return load_remote_model(directory, LocalExpertBackend(CheckpointReader(directory), dtype=backend_dtype), dtype)


def _greedy(model) -> torch.Tensor:
    return model.generate(IDS[:, :5], max_new_tokens=8, do_sample=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_remote_logits_equal_transformers(checkpoint, reference_logits, family, dtype):
    directory = checkpoint(family, dtype)
    diff = _max_diff(reference_logits(directory), _logits(_remote(directory)))
    # Measured 0.0 for every family in both dtypes (rows ordered as grouped_mm orders them).
    assert diff <= 1e-5 if dtype == torch.float32 else diff == 0.0, diff


@pytest.mark.parametrize("family", FAMILIES)
def test_remote_greedy_generation_equals_transformers(checkpoint, family):
    directory = checkpoint(family)
    assert torch.equal(_greedy(AutoModelForCausalLM.from_pretrained(directory)), _greedy(_remote(directory)))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_fused_and_sharded_checkpoints_give_the_same_logits(checkpoint, reference_logits, family):
    # Against the per-expert checkpoint's reference: from a fused file transformers keeps mmap-backed
    # expert weights 8-byte aligned, and MKL's last fp32 bit depends on alignment (Mixtral: 5e-7).
    expected = reference_logits(checkpoint(family))
    for directory in (checkpoint(family, layout="fused"), checkpoint(family, shards=6)):
        assert _max_diff(expected, _logits(_remote(directory))) <= 1e-5


def test_checkpoint_loaded_in_another_dtype(checkpoint):
    directory = checkpoint("mixtral")
    reference = _logits(AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16))
    assert _max_diff(reference, _logits(_remote(directory, torch.bfloat16, backend_dtype=torch.bfloat16))) == 0.0


def test_expert_width_off_the_simd_grid_stays_within_tolerance(checkpoint, reference_logits):
    """F = 24: transformers' SiLU runs on the strided half of a fused [N, 2F] tensor and takes a scalar
    tail that our contiguous one does not, so the last fp32 bit may differ (measured 7e-7)."""
    directory = checkpoint("mixtral", intermediate_size=24)
    assert _max_diff(reference_logits(directory), _logits(_remote(directory))) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_negative_control_one_scaled_expert_changes_logits(checkpoint, reference_logits, family):
    directory = checkpoint(family)
    local = LocalExpertBackend(CheckpointReader(directory))

    def scaled(layer: int, hidden_TH: torch.Tensor, top_k_index_TK: torch.Tensor, train_experts: bool = True) -> torch.Tensor:
        y_TKH = local(layer, hidden_TH, top_k_index_TK)
        return torch.where((top_k_index_TK == 0).unsqueeze(-1), y_TKH * 1.01, y_TKH)

    diff = _max_diff(reference_logits(directory), _logits(load_remote_model(directory, scaled)))
    assert diff > 1e-5, diff


@pytest.mark.parametrize("family", FAMILIES)
def test_client_neither_reads_nor_holds_expert_weights(checkpoint, family, monkeypatch):
    directory = checkpoint(family, torch.bfloat16)
    read: list[str] = []
    real_open = safetensors.safe_open  # what model_dir.open_safetensors opens files with

    class CountingHandle:  # records every tensor whose header or data is touched
        def __init__(self, *args, **kwargs):
            self._handle = real_open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._handle.__exit__(*exc)

        def keys(self):
            return self._handle.keys()

        def get_tensor(self, name):
            read.append(name)
            return self._handle.get_tensor(name)

        def get_slice(self, name):
            read.append(name)
            return self._handle.get_slice(name)

    monkeypatch.setattr(safetensors, "safe_open", CountingHandle)
    remote = load_remote_model(directory, backend=lambda *args: pytest.fail("no forward here"))
    reader = CheckpointReader(directory)
    assert read and not [n for n in read if reader.is_expert_tensor(n)]
    assert len(read) == len(reader.dense_state_dict())

    reference = AutoModelForCausalLM.from_pretrained(directory).state_dict()
    remote_state = remote.state_dict()
    assert remote_state.keys() == reference.keys()
    for name, tensor in remote_state.items():
        assert not tensor.is_meta, name
        if ".experts." in name:
            assert tensor.numel() == 0, name
        else:
            assert tensor.dtype == reference[name].dtype and torch.equal(tensor, reference[name]), name


def test_backend_errors_are_clear(checkpoint):
    directory = checkpoint("deepseek_v3")
    backend = LocalExpertBackend(CheckpointReader(directory))
    with pytest.raises(ConfigError, match=r"layer 0 is not an MoE layer .*MoE layers: 1-2"):
        backend(0, torch.zeros(3, 64), torch.zeros(3, 2, dtype=torch.long))
    assert backend(1, torch.zeros(0, 64), torch.zeros(0, 2, dtype=torch.long)).shape == (0, 2, 64)

    def wrong_shape(layer, hidden_TH, top_k_index_TK, train_experts=True):
        return hidden_TH  # [T, H], not [T, K, H]

    with pytest.raises(MoeSwarmError, match=r"returned shape \(32, 64\) for layer 1; expected \(32, 2, 64\)"):
        _logits(load_remote_model(directory, wrong_shape))


def test_a_config_json_that_does_not_fit_the_dense_tensors_is_one_line(checkpoint, tmp_path):
    """config.json copied from another checkpoint: a ConfigError naming one tensor, not load_state_dict's
    RuntimeError listing every size mismatch."""
    import json
    import shutil

    shutil.copytree(checkpoint("mixtral"), tmp_path / "mixtral", dirs_exist_ok=True)
    config = json.loads((tmp_path / "mixtral" / "config.json").read_text())
    (tmp_path / "mixtral" / "config.json").write_text(json.dumps({**config, "vocab_size": 128}))
    with pytest.raises(ConfigError, match=r"tensor (lm_head|model.embed_tokens).weight has shape \[256, 64\], but config.json makes it \[128, 64\]"):
        load_remote_model(tmp_path / "mixtral", backend=lambda *args: pytest.fail("no forward here"))


def test_experts_compute_in_the_config_dtype_when_the_files_store_another(checkpoint, tmp_path):
    """fp32 files under a config.json saying bfloat16: transformers computes every expert in bf16, and so
    must the experts read here (a node's); kept in fp32 they moved the bf16 logits by about 2e-2."""
    import json
    import shutil

    shutil.copytree(checkpoint("mixtral"), tmp_path / "mixtral", dirs_exist_ok=True)
    config = json.loads((tmp_path / "mixtral" / "config.json").read_text())
    (tmp_path / "mixtral" / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    reference = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral", dtype="auto"))
    assert reference.dtype == torch.bfloat16
    assert CheckpointReader(tmp_path / "mixtral").read_expert(0, 3).gate.dtype == torch.bfloat16
    assert torch.equal(_logits(_remote(tmp_path / "mixtral")), reference)
