"""deploy/configfile.py + node/config.py: YAML -> frozen NodeConfig; every bad key or value names the key."""

import dataclasses
import math
import re
import pathlib

import pytest

from moeswarm.deploy import configfile
from moeswarm.deploy.configfile import apply_overrides, build, load_yaml
from moeswarm.deploy.run_dht import check_addresses
from moeswarm.node.config import NodeConfig, OptimizerConfig
from moeswarm.protocol.dht import grpc_endpoint, ip_maddr
from moeswarm.protocol.errors import ConfigError
from moeswarm.protocol.spec import ModelSpec

MODEL = {"name": "tiny", "d_model": 8, "d_ff": 16, "n_layers": 2, "n_experts": 3}


def _node(**changes) -> dict:
    return {"model": dict(MODEL), **changes}


def test_minimal_mapping_builds_with_defaults():
    config = build(NodeConfig, _node())
    assert config.model == ModelSpec(**MODEL)
    assert config.experts == "all"
    assert config.hosted_uids() == tuple(ModelSpec(**MODEL).all_uids())
    assert config.optimizer == OptimizerConfig()
    assert config.port == 0 and config.state_dir is None


def test_full_mapping_converts_lists_and_nested_sections():
    config = build(
        NodeConfig,
        _node(
            experts=["tiny.L0.E1", "tiny.L1.E2"],
            port=50051,
            initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/QmX"],
            state_dir="/var/lib/moeswarm",
            checkpoint_interval_s=5,  # an int where a float is expected is fine
            wire_dtypes=["float32", "bfloat16"],
            optimizer={"name": "sgd", "lr": 0.5, "update_every": 4},
        ),
    )
    assert config.experts == ("tiny.L0.E1", "tiny.L1.E2") == config.hosted_uids()
    assert config.initial_peers == ("/ip4/127.0.0.1/tcp/1/p2p/QmX",)
    assert config.checkpoint_interval_s == 5.0 and isinstance(config.checkpoint_interval_s, float)
    assert config.wire_dtypes == ("float32", "bfloat16")
    assert config.optimizer == OptimizerConfig(name="sgd", lr=0.5, update_every=4)


def test_config_is_frozen():
    config = build(NodeConfig, _node())
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1


@pytest.mark.parametrize(
    "data,key",
    [
        (_node(prot=50051), "prot"),
        (_node(optimizer={"lrr": 0.1}), "optimizer.lrr"),
        ({"model": {**MODEL, "dmodel": 8}}, "model.dmodel"),
    ],
)
def test_unknown_key_is_named(data, key):
    with pytest.raises(ConfigError, match=f"unknown key {key}\\b"):
        build(NodeConfig, data)


@pytest.mark.parametrize(
    "data,key",
    [
        (_node(port="abc"), "port='abc'"),
        (_node(port=True), "port=True"),
        (_node(port=1.5), "port=1.5"),
        (_node(optimizer={"lr": "x"}), "optimizer.lr='x'"),
        (_node(optimizer={"name": "rmsprop"}), "optimizer.name='rmsprop'"),
        (_node(experts=5), "experts=5"),
        (_node(experts="some"), "experts='some'"),
        (_node(wire_dtypes="float32"), "wire_dtypes='float32'"),
        (_node(initial_peers=[1]), "initial_peers"),
        (_node(state_dir=3), "state_dir=3"),
        (_node(optimizer=[1]), "optimizer: expected a mapping"),
        ({"model": 5}, "model: expected a mapping"),
        ({"model": {**MODEL, "d_model": "8"}}, "model.d_model='8'"),
    ],
)
def test_wrong_type_is_named(data, key):
    with pytest.raises(ConfigError) as info:
        build(NodeConfig, data)
    assert key in str(info.value)


@pytest.mark.parametrize(
    "data,key",
    [
        (_node(port=70000), "port=70000"),
        (_node(dht_port=-1), "dht_port=-1"),
        (_node(announce_ttl_s=1), "announce_ttl_s"),
        (_node(max_rows=0), "max_rows=0"),
        (_node(max_message_bytes=100), "max_message_bytes=100"),
        (_node(export_chunk_timeout_s=0), "export_chunk_timeout_s=0"),
        (_node(wire_dtypes=["bfloat16"]), "must include float32"),
        (_node(wire_dtypes=["float32", "float64"]), "float64"),
        (_node(swarm="Bad Swarm"), "swarm"),
        (_node(optimizer={"lr": 0}), "optimizer.lr=0"),
        (_node(optimizer={"update_every": 0}), "optimizer.update_every=0"),
        (_node(experts=[]), "experts"),
        (_node(experts=["tiny.L0.E0", "tiny.L0.E0"]), "duplicates"),
        (_node(experts=["other.L0.E0"]), "belongs to model 'other'"),
        (_node(experts=["tiny.L2.E0"]), "outside model 'tiny'"),
        (_node(experts=["tiny-L0-E0"]), "malformed expert uid"),
        (_node(device="gpu"), "device='gpu'"),
        (_node(device="cuda:x"), "device='cuda:x'"),
        (_node(device="CPU"), "device='CPU'"),
        (_node(busy_poll_us=-1), "busy_poll_us=-1"),
        (_node(busy_poll_us=2_000_000), "busy_poll_us=2000000"),
        (_node(cpus=[0, 0]), "cpus=(0, 0): has duplicates"),
        (_node(cpus=[-1]), "cpus=(-1,)"),
        (_node(cpus=[1.5]), "cpus[0]=1.5"),
        (_node(cpus="0-3"), "cpus='0-3'"),
        ({"model": {**MODEL, "n_experts": 0}}, "model.n_experts=0"),
        (_node(host="localhost"), "host='localhost': must be an IP address"),
        (_node(host="0.0.0.0"), "listens on every interface: set announce_host"),
        (_node(host="0.0.0.0", announce_host="0.0.0.0", dht_port=4000), "announce_host='0.0.0.0'"),
        (_node(host="0.0.0.0", announce_host="example.org", dht_port=4000), "announce_host='example.org'"),
        (_node(host="0.0.0.0", announce_host="203.0.113.7"), "dht_port=0: set a fixed port"),
        (_node(announce_ttl_s=math.inf), "announce_ttl_s=inf: must be in [3, 86400]"),
        (_node(announce_ttl_s=1e300), "announce_ttl_s=1e+300"),
        (_node(checkpoint_interval_s=math.inf), "checkpoint_interval_s=inf: must be in (0, 86400]"),
    ],
)
def test_bad_value_is_named(data, key):
    with pytest.raises(ConfigError) as info:
        build(NodeConfig, data)
    assert key in str(info.value)


def test_missing_model_is_named():
    with pytest.raises(ConfigError, match="'model'"):
        build(NodeConfig, {"port": 1})


def test_missing_model_field_is_named():
    with pytest.raises(ConfigError, match="'d_ff'"):
        build(NodeConfig, {"model": {k: v for k, v in MODEL.items() if k != "d_ff"}})


def test_non_mapping_config_is_rejected():
    with pytest.raises(ConfigError, match="expected a mapping"):
        build(NodeConfig, ["model"])


def test_overrides_set_nested_values_parsed_as_yaml():
    data = _node(optimizer={"name": "sgd"})
    overrides = ["port=50051", "optimizer.lr=0.25", "experts=[tiny.L0.E0, tiny.L1.E1]", "state_dir=null"]
    overrides.append("new.deep.key=x=y")
    result = apply_overrides(data, overrides)
    assert result["port"] == 50051
    assert result["optimizer"] == {"name": "sgd", "lr": 0.25}
    assert result["experts"] == ["tiny.L0.E0", "tiny.L1.E1"]
    assert result["state_dir"] is None
    assert result["new"] == {"deep": {"key": "x=y"}}  # only the first "=" splits
    assert data == _node(optimizer={"name": "sgd"})  # the input is not modified


def test_overrides_then_build():
    config = build(NodeConfig, apply_overrides(_node(), ["optimizer.update_every=8", "model.n_layers=4"]))
    assert config.optimizer.update_every == 8 and config.model.n_layers == 4


@pytest.mark.parametrize("item,message", [("novalue", "expected key=value"), ("=3", "expected key=value")])
def test_overrides_reject_items_without_key_and_value(item, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(_node(), [item])


@pytest.mark.parametrize("item", ["port=[1", "device={a", "swarm='a"])
def test_override_with_invalid_yaml_names_the_flag_and_item(item):
    with pytest.raises(ConfigError, match=rf"--node-set {re.escape(repr(item))}: .* is not valid YAML"):
        apply_overrides(_node(), [item], flag="--node-set")


def test_override_below_a_scalar_is_rejected():
    with pytest.raises(ConfigError, match="port is not a section"):
        apply_overrides(_node(port=1), ["port.x=1"])


def test_shipped_node_configs_build():
    # node/config.py points readers at deploy/node.example.yaml: it must stay a valid config.
    deploy_dir = pathlib.Path(configfile.__file__).parent
    all_yaml = {path.name: load_yaml(path) for path in sorted(deploy_dir.glob("*.yaml"))}
    node_configs = {name: data for name, data in all_yaml.items() if "model" in data}
    assert "node.example.yaml" in node_configs
    for name, data in node_configs.items():
        config = build(NodeConfig, data)
        assert config.hosted_uids(), name


def test_load_yaml_then_build(tmp_path):
    path = tmp_path / "node.yaml"
    path.write_text(
        "model:\n  name: tiny\n  d_model: 8\n  d_ff: 16\n  n_layers: 2\n  n_experts: 3\n"
        "experts: [tiny.L0.E0]\noptimizer:\n  name: adam\n  lr: 0.001\n"
    )
    config = build(NodeConfig, load_yaml(path))
    assert config.experts == ("tiny.L0.E0",) and config.optimizer.lr == 0.001


def test_learning_rate_in_exponent_notation_is_a_float(tmp_path):
    # PyYAML follows YAML 1.1, where "1e-3" (no dot) is a string, not a float. The default lr is 1e-3
    # and that is how learning rates are usually written, in a file or as --set optimizer.lr=3e-4.
    path = tmp_path / "node.yaml"
    path.write_text("model: {name: tiny, d_model: 8, d_ff: 16, n_layers: 2, n_experts: 3}\noptimizer: {lr: 1e-3}\n")
    try:
        lr = build(NodeConfig, load_yaml(path)).optimizer.lr
    except ConfigError as e:
        raise AssertionError(f"BUG: `lr: 1e-3` in a config file is rejected: {e}") from e
    assert lr == 1e-3


def test_load_yaml_of_empty_file_is_empty_mapping(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n")
    assert load_yaml(path) == {}


@pytest.mark.parametrize(
    "text,message",
    [
        ("model: [unclosed\n", "not valid YAML"),
        ("- a\n- b\n", "must be a mapping"),
        ("just text\n", "must be a mapping"),
    ],
)
def test_load_yaml_rejects_invalid_or_non_mapping(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_yaml(path)
    assert str(path) in str(info.value)


def test_load_yaml_of_missing_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config .*missing.yaml"):
        load_yaml(tmp_path / "missing.yaml")


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_names_accepted(device):
    assert build(NodeConfig, _node(device=device)).device == device


@pytest.mark.parametrize(
    ("host", "announce_host", "public"),
    [("127.0.0.1", None, "127.0.0.1"), ("0.0.0.0", "203.0.113.7", "203.0.113.7"), ("::", "2001:db8::7", "2001:db8::7"), ("::1", None, "::1")],
)
def test_a_node_announces_announce_host_or_else_host(host, announce_host, public):
    config = build(NodeConfig, _node(host=host, announce_host=announce_host, dht_port=4000))
    assert config.public_host == public


def test_addresses_are_written_for_ipv4_and_ipv6():
    assert (ip_maddr("203.0.113.7", 4000), grpc_endpoint("203.0.113.7", 5000)) == ("/ip4/203.0.113.7/tcp/4000", "203.0.113.7:5000")
    assert (ip_maddr("2001:db8::7", 4000), grpc_endpoint("2001:db8::7", 5000)) == ("/ip6/2001:db8::7/tcp/4000", "[2001:db8::7]:5000")


@pytest.mark.parametrize(
    ("host", "port", "announce_host", "message"),
    [
        ("0.0.0.0", 4000, None, "listens on every interface: give --announce-host"),
        ("0.0.0.0", 0, "203.0.113.7", "fixed --port"),
        ("0.0.0.0", 4000, "0.0.0.0", "a specific IP"),
        ("localhost", 4000, None, "'localhost' does not appear to be an IPv4 or IPv6 address"),
        ("127.0.0.1", -1, None, r"--port -1: must be in \[0, 65535\]"),
        ("127.0.0.1", 65536, None, r"--port 65536: must be in \[0, 65535\]"),
    ],
)
def test_dht_peer_addresses_are_checked_before_it_starts(host, port, announce_host, message):
    with pytest.raises(ConfigError, match=message):
        check_addresses(host, port, announce_host)
    check_addresses("0.0.0.0", 4000, "203.0.113.7")  # and the way it is meant to be used passes


def test_a_reachable_trainable_node_is_warned_about_who_can_train_it():
    assert build(NodeConfig, _node()).exposure_warning() is None  # loopback
    public = build(NodeConfig, _node(host="0.0.0.0", announce_host="203.0.113.7", dht_port=4000))
    assert "accepts gradients from anyone who reaches 203.0.113.7" in public.exposure_warning()
    assert "max_grad_norm" in public.exposure_warning()
    clipped = build(NodeConfig, _node(host="0.0.0.0", announce_host="203.0.113.7", dht_port=4000, optimizer={"max_grad_norm": 1.0}))
    assert "max_grad_norm" not in clipped.exposure_warning()
    assert build(NodeConfig, _node(host="0.0.0.0", announce_host="203.0.113.7", dht_port=4000, trainable=False)).exposure_warning() is None
