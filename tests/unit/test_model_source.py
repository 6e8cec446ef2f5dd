"""node/model_source.py: a node loads only its experts from a model directory, with progress."""

import logging

import pytest
import torch

from moeswarm.model.lm import build_local_model, save_model
from moeswarm.model.lm_config import MoELMConfig, RoutingConfig
from moeswarm.model.model_dir import load_expert_weights, read_manifest
from moeswarm.node import model_source
from moeswarm.protocol.errors import ConfigError


@pytest.fixture
def model_dir(tmp_path):
    config = MoELMConfig(d_model=16, n_layers=2, n_heads=2, d_ff=24, d_ff_dense=32, max_seq_len=16,
                         routing=RoutingConfig(n_experts=4, k=2))
    save_model(build_local_model(config), tmp_path)
    return tmp_path


def test_loads_only_the_hosted_experts_with_their_saved_weights(model_dir):
    manifest = read_manifest(model_dir)
    spec = manifest.config.spec()
    uids = (spec.all_uids()[0], spec.all_uids()[-1])
    modules = model_source.load_expert_modules(str(model_dir), spec, uids)
    assert sorted(modules) == sorted(uids)
    saved = load_expert_weights(manifest, list(uids))
    for uid, module in modules.items():
        state = module.state_dict()
        assert state.keys() == saved[uid].keys()
        for name, tensor in state.items():
            assert torch.equal(tensor, saved[uid][name]), (uid, name)


def test_progress_is_logged_while_loading(model_dir, monkeypatch, caplog):
    monkeypatch.setattr(model_source, "PROGRESS_EVERY_S", 0.0)
    spec = read_manifest(model_dir).config.spec()
    uids = tuple(spec.all_uids())
    with caplog.at_level(logging.INFO, logger="moeswarm.node.model_source"):
        model_source.load_expert_modules(str(model_dir), spec, uids)
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith(f"loaded 1/{len(uids)} experts") for line in lines)
    assert lines[-1].startswith(f"loaded {len(uids)}/{len(uids)} experts") and str(model_dir) in lines[-1]


def test_a_directory_of_another_shape_is_refused(model_dir):
    spec = read_manifest(model_dir).config.spec()
    other = type(spec)(**{**vars(spec), "d_ff": spec.d_ff * 2})
    with pytest.raises(ConfigError, match="holds experts of shape"):
        model_source.load_expert_modules(str(model_dir), other, (spec.all_uids()[0],))


def test_only_the_named_peer_serving_the_announced_shapes_confirms_a_disagreeing_record():
    from moeswarm.protocol import expert_pb2
    from moeswarm.protocol.spec import ModelSpec

    theirs = ModelSpec(name="m", d_model=16, d_ff=96, n_layers=2, n_experts=4, moe_layers=(1,))

    def info(peer_id: str = "QmReal", **dims) -> expert_pb2.InfoResponse:
        model = dict(name="m", d_model=16, d_ff=96, n_layers=2, n_experts=4) | dims
        return expert_pb2.InfoResponse(peer_id=peer_id, model=expert_pb2.ModelSpecMsg(**model))

    assert model_source.spec_doubt(info(), "QmReal", theirs) is None  # an operator's mistake: refuse
    # a record pointing at another node's endpoint (that node answers as itself) ...
    assert model_source.spec_doubt(info("QmOther"), "QmReal", theirs) == "its endpoint answers as peer 'QmOther'"
    # ... or at a node that serves other shapes than the record says
    assert model_source.spec_doubt(info(d_ff=64), "QmReal", theirs) == (
        "its endpoint serves 'm' with d_model=16, d_ff=64, n_layers=2, n_experts=4"
    )
