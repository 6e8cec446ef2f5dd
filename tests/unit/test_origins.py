"""Origins: what names the weights an expert's line of training started from (model/experts.py
expert_origin). A model directory and the seed's init that wrote it agree on them, other seeds do
not; a client loading a directory prefers the replicas of its origins (model/directory.py)."""

from __future__ import annotations

import json
import logging

import pytest

from moeswarm.model.directory import ExpertDirectory
from moeswarm.model.lm import build_local_model, dense_state, expert_weights, save_model
from moeswarm.model.lm_config import MoELMConfig
from moeswarm.model.model_dir import MANIFEST, read_manifest, save_model_dir
from moeswarm.node.config import OptimizerConfig
from moeswarm.node.registry import ExpertRegistry
from moeswarm.protocol.errors import ConfigError
from moeswarm.protocol.records import ExpertRecord

SMALL = dict(d_model=16, n_layers=2, n_heads=2, d_ff=16, d_ff_dense=32, max_seq_len=32)


def _saved(path, seed: int):
    save_model(build_local_model(MoELMConfig(**SMALL, seed=seed)), path)
    return read_manifest(path)


def test_a_directory_and_nodes_initialised_from_its_seed_name_the_same_origins_other_seeds_do_not(tmp_path):
    manifest = _saved(tmp_path / "a", seed=3)
    origins = manifest.expert_origins()
    uids = tuple(manifest.config.remote_uids())
    assert set(origins) == set(uids) and len(set(origins.values())) == len(uids)  # one per expert
    seeded = ExpertRegistry(manifest.config.spec(), uids, seed=3, optimizer=OptimizerConfig())
    assert {uid: hosted.origin for uid, hosted in seeded.experts.items()} == origins
    other = _saved(tmp_path / "b", seed=4).expert_origins()
    assert all(other[uid] != origins[uid] for uid in uids)


def test_weights_pulled_from_a_swarm_carry_on_the_origin_recorded_with_them(tmp_path):
    manifest = _saved(tmp_path / "a", seed=3)
    uid = manifest.config.remote_uids()[0]
    model = build_local_model(manifest.config)
    experts = {u: {name: t.clone() + 1 for name, t in w.items()} for u, w in expert_weights(model).items()}  # "trained"
    save_model_dir(tmp_path / "saved", manifest.config, dense_state(model), experts, origins={uid: "0123456789abcdef"})
    saved = read_manifest(tmp_path / "saved").expert_origins()
    assert saved[uid] == "0123456789abcdef"
    assert all(saved[u] != manifest.expert_origins()[u] for u in saved if u != uid)  # new weights: a line of their own


def test_a_directory_without_checksums_has_unknown_origins_and_bad_recorded_ones_are_refused(tmp_path):
    _saved(tmp_path, seed=3)
    data = json.loads((tmp_path / MANIFEST).read_text())
    data.pop("crc32")
    (tmp_path / MANIFEST).write_text(json.dumps(data))
    assert set(read_manifest(tmp_path).expert_origins().values()) == {""}
    data["origins"] = {"tiny-moe.L0.E0": "not hex"}
    (tmp_path / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="'origins' must map experts of the model to 16 hex digits"):
        read_manifest(tmp_path)


def _record(port: int, origin: str) -> ExpertRecord:
    return ExpertRecord(peer_id=f"peer{port}", endpoint=f"127.0.0.1:{port}", queue_depth=0, rows_per_s=0.0, version=0, origin=origin)


def test_a_client_prefers_replicas_of_its_origin_and_names_the_others_once(caplog):
    mine, other = "0123456789abcdef", "fedcba9876543210"
    directory = ExpertDirectory(dht=None, swarm="s", refresh_s=3600)
    try:
        directory.expect_origins({"m.L0.E0": mine, "m.L0.E1": mine, "m.L0.E2": ""})
        records = [_record(1, mine), _record(2, other), _record(3, "")]
        with caplog.at_level(logging.WARNING, logger="moeswarm.model.directory"):
            assert directory.prefer_origin("m.L0.E0", records) == [records[0], records[2]]  # unknown: may be ours
            assert directory.prefer_origin("m.L0.E1", records) == [records[0], records[2]]
        assert caplog.text.count("peer2") == 1 and "serves m.L0.E0 from other weights than this model directory" in caplog.text
        assert "used only while no replica of this directory's weights is up" in caplog.text
        # nothing of this origin up: the others serve (a warning says so), rather than no one
        assert directory.prefer_origin("m.L0.E1", [records[1]]) == [records[1]]
        assert directory.prefer_origin("m.L0.E2", records) == records  # no origin expected: every replica
        assert directory.prefer_origin("m.L0.E3", records) == records
    finally:
        directory.close()

