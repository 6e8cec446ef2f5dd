"""protocol/spec.py (model spec, UIDs) and protocol/records.py (DHT record schemas, signatures)."""

import dataclasses
import math

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.utils import MSGPackSerializer
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.timed_storage import ValueWithExpiration

from moeswarm.protocol.errors import BadRequest, ConfigError
from moeswarm.protocol.records import (
    DEPARTED,
    MAX_UIDS_PER_NODE,
    ExpertRecord,
    NodeRecord,
    check_swarm_name,
    dht_subkey,
    dht_validators,
    expert_key,
    nodes_key,
    parse_entries,
    same_origin,
    signer_peer_id,
)
from moeswarm.protocol.spec import MAX_EXPERTS_PER_MODEL, ExpertUID, ModelSpec, check_uid_in_spec, format_uid, parse_uid

SPEC_FIELDS = dict(name="tiny-moe", d_model=8, d_ff=16, n_layers=2, n_experts=4)
SPEC = ModelSpec(**SPEC_FIELDS)
LOAD = dict(peer_id="QmPeer", endpoint="127.0.0.1:50051", queue_depth=3, rows_per_s=12.5)

# ---------------------------------------------------------------- ModelSpec and UIDs


@pytest.mark.parametrize("name", ["", "Tiny", "-tiny", "tiny moe", "tiny.moe", "a" * 65, "tïny"])
def test_model_spec_rejects_bad_name(name):
    with pytest.raises(ConfigError, match="model.name"):
        ModelSpec(**{**SPEC_FIELDS, "name": name})


@pytest.mark.parametrize("key", ["d_model", "d_ff", "n_layers", "n_experts"])
@pytest.mark.parametrize("value", [0, -1, True, 2.0, (1 << 20) + 1])
def test_model_spec_rejects_bad_dimension(key, value):
    with pytest.raises(ConfigError, match=f"model.{key}="):
        ModelSpec(**{**SPEC_FIELDS, key: value})


def test_model_spec_bounds_the_number_of_experts_and_real_models_fit():
    deepseek_v3 = ModelSpec(name="deepseek-v3", d_model=7168, d_ff=2048, n_layers=61, n_experts=256, moe_layers=tuple(range(3, 61)))
    assert deepseek_v3.expert_count() == 58 * 256 == len(deepseek_v3.all_uids())
    assert ModelSpec(**{**SPEC_FIELDS, "n_layers": 256, "n_experts": 256}).expert_count() == MAX_EXPERTS_PER_MODEL
    with pytest.raises(ConfigError, match="1048576 experts, over the limit of 65536 per model"):
        ModelSpec(**{**SPEC_FIELDS, "n_layers": 1024, "n_experts": 1024})
    # moe_layers counts, not n_layers: 4 MoE layers of 16384 experts fit in a 4096-layer model
    assert ModelSpec(**{**SPEC_FIELDS, "n_layers": 4096, "n_experts": 1 << 14, "moe_layers": [0, 1, 2, 3]}).expert_count() == 1 << 16
    with pytest.raises(ConfigError, match="model.moe_layers="):  # refused by its length, before it is sorted
        ModelSpec(**{**SPEC_FIELDS, "moe_layers": list(range(10**6))})


def test_a_forged_spec_in_a_record_does_not_parse():
    # what an attacker announced to make `moeswarm status` list 10^12 experts
    huge = dict(name="tiny", d_model=1, d_ff=1, n_layers=1 << 20, n_experts=1 << 20)
    assert ModelSpec.from_record(huge) is None
    assert ModelSpec.from_record({**huge, "n_layers": 1024, "n_experts": 1024}) is None
    assert ModelSpec.from_record({**SPEC_FIELDS, "moe_layers": ["0"]}) is None
    assert ModelSpec.from_record(SPEC_FIELDS) == SPEC


def test_has_expert_agrees_with_the_spec_s_uids():
    spec = ModelSpec(**{**SPEC_FIELDS, "n_layers": 5, "moe_layers": (1, 3)})
    experts = {(layer, expert) for layer in range(-1, 7) for expert in range(-1, 6) if spec.has_expert(layer, expert)}
    assert {(parse_uid(uid).layer, parse_uid(uid).expert) for uid in spec.all_uids()} == experts


def test_all_uids_lists_every_layer_and_expert_once():
    uids = SPEC.all_uids()
    assert len(uids) == len(set(uids)) == 2 * 4
    assert uids[0] == "tiny-moe.L0.E0" and uids[-1] == "tiny-moe.L1.E3"


@pytest.mark.parametrize("layer,expert", [(0, 0), (1, 3), (99999, 999999)])
def test_uid_parse_round_trip(layer, expert):
    uid = format_uid("tiny-moe", layer, expert)
    parsed = parse_uid(uid)
    assert parsed == ExpertUID("tiny-moe", layer, expert)
    assert str(parsed) == uid


@pytest.mark.parametrize(
    "uid",
    [
        "",
        "tiny-moe",
        "tiny-moe.L0",
        "tiny-moe.L0.E",
        "tiny-moe.E0.L0",
        "tiny-moe.L-1.E0",
        "tiny-moe.Lx.E0",
        "Tiny.L0.E0",
        "tiny-moe.L0.E0.extra",
        " tiny-moe.L0.E0",
        "tiny-moe.L123456.E0",  # more than 5 layer digits
        "a" * 200 + ".L0.E0",
    ],
)
def test_parse_uid_rejects_malformed(uid):
    with pytest.raises(BadRequest, match="malformed expert uid"):
        parse_uid(uid)


def _rejects(check, errors) -> bool:
    try:
        check()
    except errors:
        return True
    return False


@pytest.mark.parametrize(
    "check",
    [
        lambda: parse_uid("tiny-moe.L0.E0\n"),
        lambda: ModelSpec(**{**SPEC_FIELDS, "name": "tiny-moe\n"}),
        lambda: check_swarm_name("default\n"),
        lambda: ExpertRecord(**{**LOAD, "endpoint": "127.0.0.1:50051\n"}, version=0),
    ],
    ids=["uid", "model-name", "swarm", "endpoint"],
)
def test_names_with_trailing_newline_are_rejected(check):
    # spec.py and records.py anchor their regexes with `$`, which also matches before a final "\n".
    # ModelSpec(name="tiny-moe\n") then makes UIDs ("tiny-moe\n.L0.E0") that parse_uid itself rejects.
    assert _rejects(check, (BadRequest, ValueError)), (
        "BUG: a name ending in a newline was accepted; anchor the regex with \\Z or use re.fullmatch"
    )


def test_parse_uid_rejects_non_canonical_numbers():
    # "tiny-moe.L01.E0" parses as layer 1, but str() of the result is "tiny-moe.L1.E0". UIDs are compared
    # as strings (DHT keys, hosted sets), so a config listing "tiny-moe.L01.E0" passes check_uid_in_spec
    # yet hosts an expert that no client looks up, with weights seeded from a different string.
    assert _rejects(lambda: parse_uid("tiny-moe.L01.E0"), BadRequest), (
        "BUG: parse_uid accepted a UID with a leading zero, which is not the canonical form of any expert"
    )


def test_check_uid_in_spec_accepts_every_uid_of_the_spec():
    for uid in SPEC.all_uids():
        assert str(check_uid_in_spec(uid, SPEC)) == uid


@pytest.mark.parametrize(
    "uid,message",
    [
        ("other.L0.E0", "belongs to model 'other'"),
        ("tiny-moe.L2.E0", "outside model 'tiny-moe'"),
        ("tiny-moe.L0.E4", "outside model 'tiny-moe'"),
        ("tiny-moe.L0", "malformed expert uid"),
    ],
)
def test_check_uid_in_spec_errors(uid, message):
    with pytest.raises(ConfigError, match=message):
        check_uid_in_spec(uid, SPEC)


# ---------------------------------------------------------------- record schemas


def test_keys_name_swarm_and_uid():
    assert expert_key("s1", "tiny-moe.L0.E1") == "moeswarm:s1:expert:tiny-moe.L0.E1"
    assert nodes_key("s1") == "moeswarm:s1:nodes"
    with pytest.raises(ValueError, match="swarm name"):
        check_swarm_name("Bad Swarm")


def test_records_ignore_unknown_fields_from_newer_peers():
    record = ExpertRecord.model_validate({**LOAD, "version": 4, "gpu": "H100", "future": {"x": 1}})
    assert record.version == 4 and not hasattr(record, "gpu")
    node = NodeRecord.model_validate({**LOAD, "model": SPEC_FIELDS, "uids": ["tiny-moe.L0.E0"], "extra": 1})
    assert node.uids == ("tiny-moe.L0.E0",)


@pytest.mark.parametrize(
    "uids, message",
    [
        (["tiny-moe.L0.E0", "not a uid"], "malformed expert uid 'not a uid'"),
        (["tiny-moe.L0.E00"], "malformed expert uid"),
        (["other.L0.E0"], "'other.L0.E0' is not an expert of the announced model 'tiny-moe'"),
        (["tiny-moe.L2.E0"], "is not an expert"),  # the spec has 2 layers
        (["tiny-moe.L0.E4"], "is not an expert"),  # and 4 experts per layer
        (["tiny-moe.L0.E1", "tiny-moe.L0.E1"], "must not repeat"),
        ([f"tiny-moe.L0.E{i}" for i in range(MAX_UIDS_PER_NODE + 1)], f"at most {MAX_UIDS_PER_NODE} strings"),
    ],
)
def test_node_record_announces_only_experts_of_its_model(uids, message):
    with pytest.raises(ValueError, match=message):
        NodeRecord.model_validate({**LOAD, "model": SPEC_FIELDS, "uids": uids})


def test_node_record_of_a_spec_we_cannot_parse_is_checked_by_name():
    newer = {**SPEC_FIELDS, "router": "something new"}  # a newer peer's spec field
    assert NodeRecord.model_validate({**LOAD, "model": newer, "uids": ["tiny-moe.L7.E9"]}).uids == ("tiny-moe.L7.E9",)
    with pytest.raises(ValueError, match="not an expert of the announced model"):
        NodeRecord.model_validate({**LOAD, "model": newer, "uids": ["zz.L0.E0"]})
    assert MAX_UIDS_PER_NODE == MAX_EXPERTS_PER_MODEL


def test_record_round_trips_through_model_dump():
    record = ExpertRecord(**LOAD, version=2, wire_dtypes=("float32", "bfloat16"))
    assert ExpertRecord.model_validate(record.model_dump()) == record


def test_unknown_wire_dtypes_are_dropped_but_float32_is_required():
    record = ExpertRecord(**LOAD, version=0, wire_dtypes=("float32", "float8_e4m3"))
    assert record.wire_dtypes == ("float32",)
    with pytest.raises(ValueError, match="float32"):
        ExpertRecord(**LOAD, version=0, wire_dtypes=("bfloat16", "float16"))


@pytest.mark.parametrize(
    "change",
    [
        {"endpoint": "127.0.0.1"},
        {"endpoint": "127.0.0.1:0"},
        {"endpoint": "127.0.0.1:65536"},
        {"endpoint": "host name:80"},
        {"endpoint": ":80"},
        {"queue_depth": -1},
        {"rows_per_s": math.nan},
        {"rows_per_s": math.inf},
        {"rows_per_s": -1.0},
        {"peer_id": ""},
        {"version": -1},
        {"version": None},
        {"version": True},  # bool is not a count
        {"version": 1.5},
        {"queue_depth": "3"},
        {"rows_per_s": "12.5"},
        {"peer_id": 7},
        {"peer_id": "p" * 129},
        {"wire_dtypes": "float32"},  # a string, not a list of them
        {"wire_dtypes": ["float32", 3]},
    ],
)
def test_expert_record_rejects_bad_values(change):
    with pytest.raises(ValueError):
        ExpertRecord.model_validate({**LOAD, "version": 0, **change})


def test_records_are_frozen_and_keep_their_types():
    record = ExpertRecord.model_validate({**LOAD, "rows_per_s": 3, "version": 0, "wire_dtypes": ["float32"]})
    assert record.rows_per_s == 3.0 and isinstance(record.rows_per_s, float) and record.wire_dtypes == ("float32",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.version = 5  # type: ignore[misc]
    node = NodeRecord.model_validate({**LOAD, "model": SPEC_FIELDS, "uids": ["tiny-moe.L0.E0"]})
    assert NodeRecord.model_validate(node.model_dump()) == node
    with pytest.raises(ValueError, match="lacks uids"):
        NodeRecord.model_validate({**LOAD, "model": SPEC_FIELDS})
    with pytest.raises(ValueError, match="model must be a dictionary"):
        NodeRecord.model_validate({**LOAD, "model": [1], "uids": []})


def test_parse_entries_drops_invalid_and_keeps_valid(owner_key, other_key, third_key):
    good = {**LOAD, "version": 1}
    value = {
        dht_subkey(owner_key): ValueWithExpiration(good, 123.0),
        dht_subkey(other_key): ValueWithExpiration({**good, "endpoint": "nowhere"}, 123.0),
        dht_subkey(third_key): ValueWithExpiration([1, 2, 3], 123.0),
        b"unsigned": ValueWithExpiration(good, 123.0),  # no owner marker: anyone may write it
        dht_subkey(owner_key) + b"x": ValueWithExpiration(good, 123.0),  # a marker, but not the whole subkey
        b"no-value-attr": good,
    }
    records = parse_entries(value, ExpertRecord)
    assert list(records) == [dht_subkey(owner_key)]
    assert records[dht_subkey(owner_key)] == ExpertRecord(**{**good, "peer_id": signer_peer_id(dht_subkey(owner_key))})


def test_a_record_s_peer_id_is_its_signer_s_whatever_it_claims(owner_key, other_key):
    owner, other = signer_peer_id(dht_subkey(owner_key)), signer_peer_id(dht_subkey(other_key))
    value = {
        dht_subkey(owner_key): ValueWithExpiration({**LOAD, "peer_id": owner, "version": 1}, 123.0),
        # another key claims the owner's peer id (to replace it in `status`), or a low one (to lead averaging)
        dht_subkey(other_key): ValueWithExpiration({**LOAD, "peer_id": owner, "version": 9}, 123.0),
    }
    records = parse_entries(value, ExpertRecord)
    assert {record.peer_id: record.version for record in records.values()} == {owner: 1, other: 9}
    claims_low = parse_entries({dht_subkey(other_key): ValueWithExpiration({**LOAD, "peer_id": "!", "version": 9}, 123.0)}, ExpertRecord)
    assert [record.peer_id for record in claims_low.values()] == [other]


def test_signer_peer_id_is_the_libp2p_peer_id_of_the_key(owner_key):
    from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID
    from hivemind.proto import crypto_pb2

    identity = crypto_pb2.PrivateKey(key_type=crypto_pb2.RSA, data=owner_key.to_bytes()).SerializeToString()
    assert signer_peer_id(dht_subkey(owner_key)) == str(PeerID.from_identity(identity))  # what p2pd calls the peer
    for subkey in (b"[owner:ssh-rsa AAAA]", b"[owner:]", b"plain", "[owner:ssh-rsa x]", dht_subkey(owner_key)[:-1]):
        assert signer_peer_id(subkey) is None


@pytest.mark.parametrize("value", [None, [1], "text", ValueWithExpiration({**LOAD, "version": 1}, 1.0)])
def test_parse_entries_of_non_dictionary_value_is_empty(value):
    assert parse_entries(value, ExpertRecord) == {}


# ---------------------------------------------------------------- signatures, without a network


@pytest.fixture(scope="module")
def owner_key():
    return RSAPrivateKey()


@pytest.fixture(scope="module")
def other_key():
    return RSAPrivateKey()


@pytest.fixture(scope="module")
def third_key():
    return RSAPrivateKey()


def _dht_record(subkey: bytes, value) -> DHTRecord:
    # hivemind serialises key, subkey and value with MSGPack before validators see them.
    return DHTRecord(
        key=MSGPackSerializer.dumps(expert_key("default", "tiny-moe.L0.E0")),
        subkey=MSGPackSerializer.dumps(subkey),
        value=MSGPackSerializer.dumps(value),
        expiration_time=1e9,
    )


def _signed(validator, record: DHTRecord) -> DHTRecord:
    return dataclasses.replace(record, value=validator.sign_value(record))


def _validators(key) -> CompositeValidator:
    """dht_validators(key) as a DHT peer applies them."""
    return CompositeValidator(dht_validators(key))


def test_subkey_is_the_owner_public_key_marker(owner_key, other_key):
    (signer,) = [v for v in dht_validators(owner_key) if isinstance(v, RSASignatureValidator)]
    assert dht_subkey(owner_key) == signer.local_public_key
    assert dht_subkey(owner_key).startswith(b"[owner:ssh-rsa ")
    assert dht_subkey(owner_key) != dht_subkey(other_key)


def test_record_signed_by_owner_validates(owner_key, other_key):
    validator = _validators(owner_key)
    record = _signed(validator, _dht_record(dht_subkey(owner_key), {**LOAD, "version": 0}))
    assert validator.validate(record)
    # Any peer (with its own key) checks it too, and gets back the unsigned value.
    reader = RSASignatureValidator(other_key)
    assert reader.validate(record)
    assert MSGPackSerializer.loads(reader.strip_value(record)) == {**LOAD, "version": 0}


def test_owner_subkey_signed_by_another_key_fails(owner_key, other_key):
    forger = _validators(other_key)
    unsigned = _dht_record(dht_subkey(owner_key), {**LOAD, "version": 0})
    # sign_value only signs records under the signer's own marker; forge the signature as it would.
    signature = other_key.sign(MSGPackSerializer.dumps(dataclasses.astuple(unsigned)))
    forged_value = unsigned.value + b"[signature:" + signature + b"]"
    forged = dataclasses.replace(unsigned, value=forged_value)
    assert not RSASignatureValidator(owner_key).validate(forged)
    assert forger.sign_value(unsigned) == unsigned.value  # and it does not sign for others


def test_unsigned_record_under_owner_subkey_fails(owner_key):
    record = _dht_record(dht_subkey(owner_key), {**LOAD, "version": 0})
    assert not RSASignatureValidator(owner_key).validate(record)


def test_tampered_value_fails(owner_key):
    validator = _validators(owner_key)
    record = _signed(validator, _dht_record(dht_subkey(owner_key), {**LOAD, "version": 0}))
    signature = record.value[record.value.rindex(b"[signature:") :]
    tampered_value = MSGPackSerializer.dumps({**LOAD, "version": 99}) + signature
    assert not validator.validate(dataclasses.replace(record, value=tampered_value))


@pytest.mark.parametrize("subkey", [None, b"x"], ids=["plain value", "subkey without owner"])
def test_records_no_owner_signs_are_refused(owner_key, subkey):
    # A plain value (subkey None) with a later expiration replaces a key's whole dictionary in
    # hivemind's storage: any peer could take an expert out of the swarm.
    validator = _validators(owner_key)
    record = DHTRecord(
        key=MSGPackSerializer.dumps(expert_key("default", "tiny-moe.L0.E0")), subkey=MSGPackSerializer.dumps(subkey),
        value=MSGPackSerializer.dumps({**LOAD, "version": 0}), expiration_time=1e9,
    )
    assert not validator.validate(_signed(validator, record))


def test_a_signed_record_that_would_outlive_any_node_is_refused(owner_key):
    # A peer could sign its own node record expiring years away: a node gone stayed in status and in
    # every client's view for as long as the record said. Nodes announce for at most MAX_RECORD_TTL_S.
    import time

    from moeswarm.protocol.records import MAX_RECORD_TTL_S, RECORD_CLOCK_SLACK_S

    validator = _validators(owner_key)
    subkey = dht_subkey(owner_key)

    def record(expires_in_s: float):
        return _signed(validator, dataclasses.replace(
            _dht_record(subkey, {**LOAD, "version": 0}), expiration_time=time.time() + expires_in_s,
        ))

    assert validator.validate(record(30))  # a default node's TTL
    assert validator.validate(record(MAX_RECORD_TTL_S))  # the longest announce_ttl_s a node takes
    assert not validator.validate(record(MAX_RECORD_TTL_S + RECORD_CLOCK_SLACK_S + 60))
    assert not validator.validate(record(365 * 86400))


def test_expert_record_trainable_defaults_to_true_for_records_that_predate_it():
    assert ExpertRecord.model_validate({**LOAD, "version": 0}).trainable is True
    frozen = ExpertRecord(**LOAD, version=0, trainable=False)
    assert ExpertRecord.model_validate(frozen.model_dump()).trainable is False
    with pytest.raises(ValueError, match="trainable must be a boolean"):
        ExpertRecord.model_validate({**LOAD, "version": 0, "trainable": "no"})


def test_expert_record_state_is_optional_and_checked():
    assert ExpertRecord.model_validate({**LOAD, "version": 0}).state == ""  # a peer from before the field
    named = ExpertRecord(**LOAD, version=3, state="a1b2c3d4e5f6.7")
    assert ExpertRecord.model_validate(named.model_dump()).state == "a1b2c3d4e5f6.7"
    for bad in (7, "x" * 65, None):
        with pytest.raises(ValueError, match="state must be a string of 1 to 64 characters"):
            ExpertRecord.model_validate({**LOAD, "version": 0, "state": bad})


def test_expert_record_origin_is_optional_and_checked():
    assert ExpertRecord.model_validate({**LOAD, "version": 0}).origin == ""  # unknown: a peer from before the field
    named = ExpertRecord(**LOAD, version=0, origin="0123456789abcdef")
    assert ExpertRecord.model_validate(named.model_dump()).origin == "0123456789abcdef"
    for bad in (7, "0123456789ABCDEF", "0123456789abcde", "0123456789abcdef0", None):
        with pytest.raises(ValueError, match="origin must be empty or 16 hex digits"):
            ExpertRecord.model_validate({**LOAD, "version": 0, "origin": bad})
    assert same_origin("", "0123456789abcdef") and same_origin("0123456789abcdef", "0123456789abcdef")
    assert not same_origin("0123456789abcdef", "fedcba9876543210")


def test_a_departed_marker_is_dropped_quietly_like_an_entry_that_was_never_there(owner_key, other_key):
    value = {
        dht_subkey(owner_key): ValueWithExpiration(DEPARTED, 123.0),
        dht_subkey(other_key): ValueWithExpiration({**LOAD, "version": 1}, 123.0),
    }
    assert list(parse_entries(value, ExpertRecord)) == [dht_subkey(other_key)]
    with pytest.raises(ValueError):  # what a reader without the marker makes of it: an invalid record, dropped
        ExpertRecord.model_validate(DEPARTED)


def test_lookup_answers_carry_plain_entries_and_drop_what_is_not_one():
    from moeswarm.protocol.dht import DHTEntry, _plain

    subkey = b"[owner:ssh-rsa AAAA]"
    entries = _plain({subkey: ValueWithExpiration({**LOAD, "version": 0}, 5.0), b"x": 1})
    assert entries == {subkey: DHTEntry({**LOAD, "version": 0}, 5.0), b"x": DHTEntry(None, 0.0)}
    assert all(type(entry) is DHTEntry for entry in entries.values())  # no hivemind type left to unpickle
    assert _plain([1, 2]) == [1, 2]  # not a dictionary: left to parse_entries, which drops it


def test_a_record_s_data_port_is_optional_checked_and_names_its_endpoint():
    old = ExpertRecord.model_validate({**LOAD, "version": 0})  # a peer from before data ports
    assert old.data_port == 0 and old.data_endpoint is None
    record = ExpertRecord(**{**LOAD, "endpoint": "[::1]:50051"}, version=0, data_port=50052)
    assert record.data_endpoint == "[::1]:50052"
    assert ExpertRecord.model_validate(record.model_dump()) == record
    for bad in (-1, 65536, True, "50052", 1.5):
        with pytest.raises(ValueError, match="data_port"):
            ExpertRecord.model_validate({**LOAD, "version": 0, "data_port": bad})
