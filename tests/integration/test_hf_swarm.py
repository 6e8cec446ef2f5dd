"""Hugging Face MoE checkpoints served by real node processes: `moeswarm node --model DIR --experts
SPEC`, `moeswarm.model.from_pretrained(DIR, initial_peers=...)`, logits and greedy tokens equal to the
plain transformers model; bad expert requests and mismatched checkpoints are refused at start."""

from __future__ import annotations

import pathlib
import shlex
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "unit"))
from hf_tiny import save_tiny, save_tiny_tokenizer  # noqa: E402
from procs import Proc, ProcGroup, read_until, spawn, start_dht_peer, wait_ready  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import moeswarm.model  # noqa: E402
from moeswarm.node.registry import can_prepack  # noqa: E402
from moeswarm.protocol.client_dht import IsolatedDHT  # noqa: E402

SWARM = "hf"
IDS = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(2))
# (family, dtype, layout, shards) -> expert specs, one node each
CHECKPOINTS = {
    ("mixtral", torch.float32, "fused", 3): ["layers all, experts 0-3", "layers all, experts 4-7"],
    ("mixtral", torch.bfloat16, "per_expert", 1): ["all"],
    ("qwen2_moe", torch.float32, "per_expert", 2): ["all"],
    ("qwen2_moe", torch.bfloat16, "per_expert", 1): ["all"],
    ("qwen3_moe", torch.float32, "per_expert", 1): ["all"],
    ("olmoe", torch.float32, "per_expert", 1): ["all"],
    ("deepseek_v3", torch.float32, "per_expert", 1): ["layers 1-2, experts all"],
    ("gpt_oss", torch.float32, "fused", 1): ["all"],
}
# Nodes started with prepack_weights: bf16 experts computed with packed weights must give the same bits.
PREPACKED = {("mixtral", torch.bfloat16, "per_expert", 1)}


def checkpoint_name(family, dtype, layout, shards) -> str:
    return f"{family}-{str(dtype).split('.')[-1]}-{layout}-{shards}".replace("_", "-")


def node_cmd(model_dir: pathlib.Path, experts: str, peers: list[str], *extra: str) -> list[str]:
    return ["node", "--model", str(model_dir), "--experts", experts, "--initial-peers", *peers, "--set", f"swarm={SWARM}", *extra]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    group = ProcGroup()
    try:
        dht = group.add(start_dht_peer(root / "dht"))
        for key, specs in CHECKPOINTS.items():
            family, dtype, layout, shards = key
            model_dir = root / checkpoint_name(*key)
            save_tiny(family, model_dir, dtype=dtype, layout=layout, shards=shards)
            for i, experts in enumerate(specs):
                work = root / f"node-{model_dir.name}-{i}"
                extra = ("--set", "prepack_weights=true") if key in PREPACKED else ()
                group.spawn(work, *node_cmd(model_dir, experts, dht.ready["maddrs"], *extra))
        group.wait_ready(timeout_s=150)
        client_dht = IsolatedDHT(dht.ready["maddrs"])  # one client DHT peer for every checkpoint
        try:
            yield root, dht.ready["maddrs"], client_dht
        finally:
            client_dht.close()
    finally:
        group.kill()


@pytest.mark.parametrize("key", list(CHECKPOINTS), ids=lambda key: checkpoint_name(*key))
def test_swarm_logits_and_greedy_tokens_equal_transformers(swarm, key):
    root, _, client_dht = swarm
    model_dir = root / checkpoint_name(*key)
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model = moeswarm.model.from_pretrained(model_dir, initial_peers=[], swarm=SWARM, dht=client_dht)
    try:
        assert all(p.numel() == 0 for n, p in model.named_parameters() if ".mlp.experts." in n)
        with torch.no_grad():
            got, want = model(IDS).logits, reference(IDS).logits
        assert got.dtype == want.dtype == key[1]
        if key[1] == torch.bfloat16:
            assert torch.equal(got, want)  # same experts, same combine order and precision
        else:
            assert (got - want).abs().max().item() <= 1e-5
        generated = model.generate(IDS[:1, :6], max_new_tokens=8, do_sample=False)
        expected = reference.generate(IDS[:1, :6], max_new_tokens=8, do_sample=False)
        assert torch.equal(generated, expected)
        assert model.moeswarm_client.expert_wait_s > 0  # the experts really ran on the nodes
        if key in PREPACKED:  # every expert packed (2 layers x 8), where this CPU's oneDNN has bf16 kernels
            log = (root / f"node-{model_dir.name}-0" / "log.txt").read_text()
            assert f"prepacked the weights of {16 if can_prepack(key[1]) else 0} of 16 experts" in log, log[-2000:]
    finally:
        model.moeswarm_client.close()


def test_node_refuses_experts_the_checkpoint_does_not_have(swarm, tmp_path, cli_here):
    root, peers, _ = swarm
    model_dir = root / checkpoint_name("deepseek_v3", torch.float32, "per_expert", 1)
    cases = {"layers 0-1, experts 0": "layer 0 has no experts", "layers 1, experts 6-9": "expert 8 does not exist"}
    for i, (experts, message) in enumerate(cases.items()):
        result = cli_here(*node_cmd(model_dir, experts, peers))  # refused before the node starts anything
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "MoE layers: 1-2" in result.stderr or "0-7" in result.stderr


def test_node_refuses_a_checkpoint_whose_experts_disagree_with_the_swarm(swarm, tmp_path):
    """Same model name as a served checkpoint, other expert width: the node will not join."""
    root, peers, _ = swarm
    served = root / checkpoint_name("olmoe", torch.float32, "per_expert", 1)
    other = tmp_path / served.name  # the same folder name, so the same default model name
    save_tiny("olmoe", other, intermediate_size=64)
    work = tmp_path / "node"
    popen = spawn(work, *node_cmd(other, "all", peers))
    assert popen.wait(90) == 2
    log = (work / "log.txt").read_text()
    assert "already serves model" in log and "d_ff=96" in log and "d_ff=64" in log, log[-2000:]


def test_swarm_up_spreads_a_checkpoint_over_nodes_with_replicas(tmp_path, cli_here):
    model_dir = tmp_path / "qwen3-tiny"
    save_tiny("qwen3_moe", model_dir)
    save_tiny_tokenizer(model_dir)
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    cli = [sys.executable, "-m", "moeswarm.deploy.cli"]
    up = subprocess.Popen(
        [*cli, "swarm", "up", "--model", str(model_dir), "--nodes", "3", "--replicas", "2", "--run-dir", str(tmp_path / "run")],
        stdout=open(tmp_path / "up.txt", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        text = read_until(up, tmp_path / "up.txt", "Ctrl-C stops the swarm", timeout_s=150)
        peer = next(line.split()[-1] for line in text.splitlines() if line.startswith("initial peers:"))
        rows = [line.split() for line in text.splitlines() if line.startswith("qwen3-tiny.L")]
        assert len(rows) == 2 * 8 and all(len(row) == 3 for row in rows)  # every expert on 2 endpoints
        printed = next(shlex.split(line) for line in text.splitlines() if line.strip().startswith("moeswarm generate"))
        generated = cli_here(*printed[1:], "--max-new-tokens", "4")  # the generate command swarm up suggests works as printed
        assert generated.returncode == 0 and "4 tokens" in generated.stderr, generated.stderr
        model = moeswarm.model.from_pretrained(model_dir, initial_peers=[peer])
        try:
            with torch.no_grad():
                assert (model(IDS).logits - reference(IDS).logits).abs().max().item() <= 1e-5
        finally:
            model.moeswarm_client.close()
    finally:
        up.send_signal(2)
        try:
            up.wait(20)
        finally:
            Proc(up, tmp_path / "run", {}).kill()


def test_training_through_an_imported_model_matches_transformers_grads_and_moves_remote_experts(swarm, tmp_path):
    """One SGD step on the nodes: before it, every dense gradient equals transformers' autograd."""
    _, peers, _ = swarm
    model_dir = tmp_path / "mixtral-train"
    save_tiny("mixtral", model_dir)
    node = spawn(tmp_path / "node", *node_cmd(model_dir, "all", peers, "--set", "optimizer.name=sgd", "--set", "optimizer.lr=0.5"))
    proc = Proc(node, tmp_path / "node", {})
    try:
        proc.ready = wait_ready(node, tmp_path / "node", timeout_s=120)
        reference = AutoModelForCausalLM.from_pretrained(model_dir)
        model = moeswarm.model.from_pretrained(model_dir, initial_peers=peers, swarm=SWARM)
        try:
            with torch.no_grad():
                before = model(IDS).logits
            model.eval()  # eval mode: input grads come back, the shared experts are not trained
            model(IDS, labels=IDS).loss.backward()
            with torch.no_grad():
                assert torch.equal(model(IDS).logits, before)
            model.zero_grad(set_to_none=True)
            for m in (reference, model):
                m.train()
                m(IDS, labels=IDS).loss.backward()
            dense = {n: p.grad for n, p in reference.named_parameters() if ".mlp.experts." not in n}
            got = {n: p.grad for n, p in model.named_parameters() if ".mlp.experts." not in n}
            assert set(got) == set(dense) and all(g is not None for g in got.values())
            worst = max((got[n] - dense[n]).abs().max().item() / (dense[n].abs().max().item() + 1e-12) for n in dense)
            assert worst <= 1e-4, worst  # embeddings, attention and routers all got transformers' grads
            model.eval()
            with torch.no_grad():
                after = model(IDS).logits  # the nodes applied SGD to their experts
            assert (after - before).abs().max().item() > 1e-4
        finally:
            model.moeswarm_client.close()
    finally:
        proc.kill()


def test_generate_cli_streams_a_checkpoint_like_transformers(swarm, tmp_path, cli_here):
    """`moeswarm generate --model CHECKPOINT`: the checkpoint's tokenizer, transformers' generate(), the
    experts on the nodes; the text equals plain transformers' greedy continuation, and --local's."""
    root, peers, _ = swarm
    model_dir = root / checkpoint_name("mixtral", torch.float32, "fused", 3)
    save_tiny_tokenizer(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = "def f(x):"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    new_ids = reference.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
    expected = prompt + tokenizer.decode(new_ids, skip_special_tokens=True) + "\n"
    cli = ["generate", "--model", str(model_dir), "--prompt", prompt, "--max-new-tokens", "10"]
    runs = {"swarm": ["--initial-peers", *peers, "--swarm", SWARM], "local": ["--local"]}
    for name, extra in runs.items():
        result = cli_here(*cli, *extra)
        assert result.returncode == 0, result.stderr
        assert result.stdout == expected, (name, result.stdout, expected)
        assert "tokens/s decoding" in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert ("waiting for experts" in result.stderr) == (name == "swarm"), result.stderr
    too_long = cli_here(*cli[:-1], "100000", "--local")
    assert too_long.returncode == 2 and "--max-new-tokens 100000: the 9-token prompt leaves room for at most" in too_long.stderr
