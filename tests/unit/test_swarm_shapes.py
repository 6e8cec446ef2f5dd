"""A client loading a model directory is told at once when the swarm serves that model name with other
expert shapes (a directory of another size), not only by the first call's shape error. A stand-in DHT
answers from a dict of signed entries."""

from __future__ import annotations

import logging
import types

from hivemind.utils.crypto import RSAPrivateKey

from moeswarm.model.directory import warn_if_served_with_other_shapes
from moeswarm.protocol.client_dht import IsolatedDHT
from moeswarm.protocol.records import NodeRecord, dht_subkey, nodes_key, signer_peer_id
from moeswarm.protocol.spec import ModelSpec

SPEC = ModelSpec(name="tiny-moe", d_model=128, d_ff=256, n_layers=4, n_experts=8)


class StandInDHT(IsolatedDHT):
    def __init__(self, nodes: dict[bytes, ModelSpec]):
        entries = {}
        for port, (subkey, spec) in enumerate(nodes.items(), start=1000):
            record = NodeRecord(peer_id="p", endpoint=f"127.0.0.1:{port}", queue_depth=0, rows_per_s=0.0, model=vars(spec).copy(), uids=())
            entries[subkey] = types.SimpleNamespace(value=record.model_dump())
        self.records = {nodes_key("default"): entries}

    def get_records(self, keys, timeout_s=0.0):
        return {key: self.records.get(key) for key in keys}

    def close(self):
        pass


def test_nodes_of_the_same_model_name_with_other_shapes_are_named(caplog):
    bigger = ModelSpec(name="tiny-moe", d_model=256, d_ff=512, n_layers=4, n_experts=8)
    other_model = ModelSpec(name="another", d_model=64, d_ff=64, n_layers=1, n_experts=2)
    same, unrelated = dht_subkey(RSAPrivateKey()), dht_subkey(RSAPrivateKey())
    dht = StandInDHT({same: SPEC, unrelated: other_model})
    with caplog.at_level(logging.WARNING):
        assert warn_if_served_with_other_shapes(dht, "default", SPEC) == []  # another model's nodes are no concern
        assert caplog.text == ""
        assert warn_if_served_with_other_shapes(dht, "default", bigger) == [signer_peer_id(same)]
    assert (
        "1 node(s) of swarm 'default' serve model 'tiny-moe' with other expert shapes "
        f"(e.g. {signer_peer_id(same)} at 127.0.0.1:1000: d_model 128, d_ff 256, 4 layers, 8 experts) "
        "than this one (d_model 256, d_ff 512, 4 layers, 8 experts)"
    ) in caplog.text
