"""The MoE language model in one process: KV cache, generation, tokenizer, model directory, configs."""

from __future__ import annotations

import json

import pytest
import torch

from moeswarm.deploy.model_cli import ROUTING_PRESETS, config_from_args
from moeswarm.model.generation import SamplingConfig, generate, pick_next
from moeswarm.model.lm import build_local_model, open_model, save_model
from moeswarm.model.lm_config import MoELMConfig
from moeswarm.model.model_dir import MANIFEST, load_expert_weights, read_manifest
from moeswarm.model.routing import RoutingConfig
from moeswarm.model.tokenizer import ByteTokenizer
from moeswarm.model.transformer import KVCache
from moeswarm.protocol.errors import ConfigError

SMALL = dict(d_model=32, n_layers=3, n_heads=4, d_ff=32, d_ff_dense=64, max_seq_len=64)
MODES = {
    "topk": RoutingConfig(n_experts=4, k=2),
    "shared": RoutingConfig(n_experts=4, k=2, n_shared=1),
    "soft": RoutingConfig(mode="soft", n_experts=3, k=3),
    "hier": RoutingConfig(mode="hierarchical", n_experts=8, n_groups=4, k_groups=2, k=1),
}


def small(routing: RoutingConfig = MODES["topk"], **extra) -> MoELMConfig:
    return MoELMConfig(**{**SMALL, **extra}, routing=routing)


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 258, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", list(MODES))
def test_kv_cache_steps_equal_the_full_forward(mode):
    model = build_local_model(small(MODES[mode], n_kv_heads=2)).eval()
    x = ids(2, 12)
    full = model(x)
    cache = KVCache.empty(model.config, 2, 12)
    chunks = [model(x[:, :5], cache)] + [model(x[:, t : t + 1], cache) for t in range(5, 12)]
    assert cache.length == 12
    assert (torch.cat(chunks, dim=1) - full).abs().max().item() <= 1e-5


def test_attention_is_causal():
    model = build_local_model(small()).eval()
    x = ids(1, 10)
    y = x.clone()
    y[0, 7:] = (y[0, 7:] + 1) % 258
    # (not bit-equal: expert matmuls see different token groups, so different GEMM blockings)
    assert (model(x)[:, :7] - model(y)[:, :7]).abs().max().item() <= 1e-5
    assert (model(x)[:, 7:] - model(y)[:, 7:]).abs().max().item() > 1e-3


@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_generation_with_cache_equals_without(mode):
    model = build_local_model(small(MODES[mode]))
    prompt = ids(2, 6, seed=3)
    cached = generate(model, prompt, SamplingConfig(max_new_tokens=12))
    recomputed = generate(model, prompt, SamplingConfig(max_new_tokens=12), use_cache=False)
    assert cached.tokens == recomputed.tokens and len(cached.tokens[0]) == 12
    assert cached.steps == 11


def test_generation_leaves_the_model_in_the_mode_it_found():
    model = build_local_model(small())
    for training in (True, False):
        model.train(training)
        generate(model, ids(1, 4), SamplingConfig(max_new_tokens=2))  # a sample taken mid-training
        assert model.training == training and all(m.training == training for m in model.modules())


def test_generation_stops_at_eos_per_sequence():
    model = build_local_model(small())
    prompt = ids(2, 4)
    free = generate(model, prompt, SamplingConfig(max_new_tokens=10))
    eos = free.tokens[0][2]  # make the third token of sequence 0 the end of text
    stopped = generate(model, prompt, SamplingConfig(max_new_tokens=10, eos_id=eos))
    assert stopped.tokens[0] == free.tokens[0][: free.tokens[0].index(eos) + 1]
    if eos not in free.tokens[1]:
        assert stopped.tokens[1] == free.tokens[1]


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus():
    model = build_local_model(small())
    prompt = ids(1, 4)
    a = generate(model, prompt, SamplingConfig(max_new_tokens=16, temperature=1.0, seed=5))
    b = generate(model, prompt, SamplingConfig(max_new_tokens=16, temperature=1.0, seed=5))
    greedy = generate(model, prompt, SamplingConfig(max_new_tokens=16))
    tiny_p = generate(model, prompt, SamplingConfig(max_new_tokens=16, temperature=1.0, top_p=1e-6, seed=5))
    assert a.tokens == b.tokens and tiny_p.tokens == greedy.tokens
    logits = torch.tensor([[0.0, 3.0, 2.9, -5.0]])
    picks = {int(pick_next(logits, SamplingConfig(temperature=1.0, top_p=0.9), torch.Generator().manual_seed(s))) for s in range(200)}
    assert picks == {1, 2}  # p = .50, .45, ...: the 0.9 nucleus holds exactly tokens 1 and 2


def test_generation_refuses_too_long_requests():
    model = build_local_model(small())
    with pytest.raises(ValueError, match="max_seq_len=64"):
        generate(model, ids(1, 10), SamplingConfig(max_new_tokens=60))
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)


def test_byte_tokenizer_round_trip_and_streaming():
    tok = ByteTokenizer()
    text = "naïve 日本 print('x')\n"
    encoded = tok.encode(text)
    assert encoded[0] == tok.bos_id and tok.decode(encoded + [tok.eos_id]) == text
    stream = tok.stream_decoder()
    pieces = [stream.push(t) for t in encoded] + [stream.flush()]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)


@pytest.mark.parametrize("mode", ["shared", "hier"])
def test_model_directory_round_trip(tmp_path, mode):
    model = build_local_model(small(MODES[mode], first_dense=1, seed=4))
    save_model(model, tmp_path)
    manifest = read_manifest(tmp_path)
    assert manifest.config == model.config
    loaded = open_model(tmp_path).model
    x = ids(2, 9)
    assert torch.equal(loaded(x), model(x))
    uid = model.config.spec().all_uids()[-1]
    only = load_expert_weights(manifest, [uid])
    assert list(only) == [uid] and only[uid]["w1.weight"].shape == (32, 32)


def test_model_directory_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match=r"holds neither moeswarm-model.json \(a moeswarm model directory.*nor config.json \(a Hugging Face"):
        read_manifest(tmp_path)
    with pytest.raises(ConfigError, match="nowhere: no such folder"):
        read_manifest(tmp_path / "nowhere")
    save_model(build_local_model(small()), tmp_path)
    data = json.loads((tmp_path / MANIFEST).read_text())
    data["config"]["n_heads"] = 5
    (tmp_path / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="n_heads"):
        read_manifest(tmp_path)
    data["config"]["n_heads"] = 4
    data["experts"].popitem()
    (tmp_path / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="'experts' must list exactly"):
        read_manifest(tmp_path)
    with pytest.raises(ConfigError, match="not in model directory"):
        load_expert_weights(read_manifest(_fresh(tmp_path / "b")), ["other.L0.E0"])


def test_a_vocab_smaller_than_the_tokenizer_is_refused_not_an_index_error(tmp_path):
    # `model init --set vocab_size=10` wrote a model whose generate and training died with IndexError.
    with pytest.raises(ConfigError, match="vocab_size=10: must be at least the tokenizer's 258 tokens"):
        save_model(build_local_model(config_from_args("tiny-moe", "tiny", "topk", ["vocab_size=10"])), tmp_path / "small")
    assert not (tmp_path / "small").exists()
    _edit_manifest(_fresh(tmp_path / "edited"), lambda data: data["config"].update(vocab_size=10))
    with pytest.raises(ConfigError, match="vocab_size=10: must be at least"):
        read_manifest(tmp_path / "edited")


@pytest.mark.parametrize("fail_at", [1, 3])
def test_an_interrupted_save_leaves_the_model_that_was_there(tmp_path, monkeypatch, fail_at):
    # A second Ctrl-C while train_lm.py saves, a full disk, kill -9: the save deleted the manifest
    # first and replaced the files one by one, so the folder held no model at all afterwards.
    import safetensors.torch

    path = _fresh(tmp_path / "model")
    before = open_model(path).model.state_dict()
    writes, save_file = [], safetensors.torch.save_file

    def failing_save_file(tensors, filename, *args, **kwargs):
        writes.append(filename)
        if len(writes) == fail_at:
            raise KeyboardInterrupt
        return save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    with pytest.raises(KeyboardInterrupt):
        save_model(build_local_model(small(seed=7)), path)
    monkeypatch.undo()
    after = open_model(path).model.state_dict()  # the old model, whole and checked
    assert after.keys() == before.keys() and all(torch.equal(after[name], before[name]) for name in before)
    assert not [p.name for p in path.iterdir() if p.name.endswith(".tmp")]


def test_a_save_removes_what_a_killed_save_left_behind_but_not_a_running_ones(tmp_path):
    import os
    import time

    from moeswarm.model.model_dir import STALE_TEMP_S

    path = _fresh(tmp_path / "model")
    stale, running = path / ".dense.safetensors.0badc0de.tmp", path / ".experts-L000.safetensors.12345678.tmp"
    for tmp in (stale, running):
        tmp.write_bytes(b"partial")
    old = time.time() - STALE_TEMP_S - 60
    os.utime(stale, (old, old))
    save_model(build_local_model(small()), path)
    assert not stale.exists() and running.exists()


def _fresh(path):
    save_model(build_local_model(small()), path)
    return path


def _truncate(file):
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _flip_bit(file, tensor=None):
    """Flip one bit in the data of `tensor` (default: the file's last byte) of a safetensors file."""
    data = bytearray(file.read_bytes())
    header_bytes = int.from_bytes(data[:8], "little")
    offset = len(data) - 1
    if tensor is not None:
        offset = 8 + header_bytes + json.loads(data[8 : 8 + header_bytes])[tensor]["data_offsets"][0]
    data[offset] ^= 0x10
    file.write_bytes(bytes(data))


def _edit_manifest(path, edit):
    data = json.loads((path / MANIFEST).read_text())
    edit(data)
    (path / MANIFEST).write_text(json.dumps(data))


def _drop_last_layer(data):
    data["config"]["n_layers"] -= 1
    data["experts"] = {uid: file for uid, file in data["experts"].items() if ".L2." not in uid}


DAMAGES = {  # what was done to a model directory -> what the error must say
    "expert file missing": (lambda p: (p / "experts-L001.safetensors").unlink(), r"experts-L001.safetensors is missing"),
    "expert file truncated": (lambda p: _truncate(p / "experts-L001.safetensors"),
                              r"experts-L001.safetensors is not a complete safetensors file"),
    "dense file missing": (lambda p: (p / "dense.safetensors").unlink(), r"dense.safetensors is missing"),
    "dense file truncated": (lambda p: _truncate(p / "dense.safetensors"), r"dense.safetensors is not a complete safetensors"),
    "expert mapped to another file": (
        lambda p: _edit_manifest(p, lambda d: d["experts"].update({"tiny-moe.L1.E0": "experts-L002.safetensors"})),
        r"experts-L002.safetensors holds no tensor tiny-moe.L1.E0.w1.weight",
    ),
    "n_layers edited": (lambda p: _edit_manifest(p, _drop_last_layer), r"dense.safetensors does not fit the config .*blocks.2"),
    "n_layers edited alone": (lambda p: _edit_manifest(p, lambda d: d["config"].update(n_layers=2)),
                              r"'experts' must list exactly .*tiny-moe.L2.E0 is not an expert"),
    "d_model edited": (lambda p: _edit_manifest(p, lambda d: d["config"].update(d_model=64)),
                       r"dense.safetensors does not fit the config .* has shape \[258, 32\], the config needs \[258, 64\]"),
    "expert file a directory": (lambda p: _replace_with_dir(p / "experts-L001.safetensors"),
                                r"experts-L001.safetensors is a directory, not a safetensors file"),
    "manifest cut short": (lambda p: _truncate(p / MANIFEST), r"cannot read .*moeswarm-model.json: "),
    "config not a mapping": (lambda p: _edit_manifest(p, lambda d: d.update(config="x")),
                             r"moeswarm-model.json: config: expected a mapping"),
    "expert file outside the directory": (
        lambda p: _edit_manifest(p, lambda d: d["experts"].update({"tiny-moe.L1.E0": "../dense.safetensors"})),
        r"expert tiny-moe.L1.E0 is in '../dense.safetensors', which is not a file name in",
    ),
    "expert file not a name": (lambda p: _edit_manifest(p, lambda d: d["experts"].update({"tiny-moe.L1.E0": 5})),
                               r"expert tiny-moe.L1.E0 is in 5, which is not a file name in"),
    # safetensors reads a flipped bit without complaint: the manifest's CRC-32 of each tensor catches it
    "a bit flipped in an expert": (lambda p: _flip_bit(p / "experts-L001.safetensors", "tiny-moe.L1.E1.w2.weight"),
                                   r"experts-L001.safetensors: tensor tiny-moe.L1.E1.w2.weight does not match the checksum"),
    "a bit flipped in the dense file": (lambda p: _flip_bit(p / "dense.safetensors"),
                                        r"dense.safetensors: tensor \S+ does not match the checksum"),
    "checksums not a mapping": (lambda p: _edit_manifest(p, lambda d: d.update(crc32="x")), r"'crc32' must map each file"),
}


def test_a_model_directory_written_before_checksums_still_loads(tmp_path):
    _edit_manifest(_fresh(tmp_path), lambda d: d.pop("crc32"))
    _flip_bit(tmp_path / "dense.safetensors")  # unchecked, as before: nothing to compare with
    with open_model(tmp_path) as opened:  # no ConfigError
        assert opened.model.config.n_layers == small().n_layers


def _replace_with_dir(file):
    file.unlink()
    file.mkdir()


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_model_directory_is_a_config_error_naming_the_file(tmp_path, damage):
    do, message = DAMAGES[damage]
    do(_fresh(tmp_path))
    with pytest.raises(ConfigError, match=message):
        open_model(tmp_path)


def test_a_model_directory_save_that_fails_leaves_no_temp_file(tmp_path):
    # Before: the temp file of the tensors that could not take their place stayed behind.
    (tmp_path / "dense.safetensors").mkdir()  # nothing can be renamed over it
    with pytest.raises(OSError):
        save_model(build_local_model(small()), tmp_path)
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["dense.safetensors"]


def test_a_hugging_face_checkpoint_is_named_as_such(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="is a Hugging Face checkpoint.*moeswarm.model.from_pretrained"):
        read_manifest(tmp_path)


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="n_heads"):
        small(n_heads=5)
    with pytest.raises(ConfigError, match="first_dense"):
        small(first_dense=3)
    with pytest.raises(ConfigError, match=r"min_experts.*\[1, 2\]"):
        small(MODES["hier"], min_experts=3)
    assert small(MODES["soft"], min_experts=3).slots_per_token() == 3


def test_layer_pattern_and_uids():
    config = small(RoutingConfig(n_experts=2, k=1, n_shared=1), n_layers=6, first_dense=1, moe_every=2)
    assert config.moe_layers() == (1, 3, 5)
    assert config.spec().all_uids()[:3] == ["tiny-moe.L1.E0", "tiny-moe.L1.E1", "tiny-moe.L1.E2"]
    assert "tiny-moe.L1.E2" not in config.remote_uids()  # the shared expert runs on the client
    model = build_local_model(config)
    assert [type(b.ffn).__name__ for b in model.blocks] == ["SwiGLUExpert", "LocalMoE"] * 3


@pytest.mark.parametrize("preset", list(ROUTING_PRESETS))
def test_cli_presets_build_and_run(preset):
    config = config_from_args("preset-test", "tiny", preset, ["d_model=32", "n_heads=2", "n_layers=2"])
    model = build_local_model(config)
    logits = model(ids(1, 5))
    assert logits.shape == (1, 5, 258) and torch.isfinite(logits).all()
    assert set(model.aux_losses()) == {"load_balancing", "z_loss", "dropped_fraction"}


def test_training_step_reduces_loss_and_reports_aux_losses():
    torch.manual_seed(0)
    model = build_local_model(small())
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    text = torch.tensor([[256, *b"def f(x): return x + 1\n" * 2]])
    losses = []
    for _ in range(30):
        logits = model(text[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 258), text[:, 1:].reshape(-1))
        aux = model.aux_losses()
        (loss + 0.01 * aux["load_balancing"] + 1e-3 * aux["z_loss"]).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
