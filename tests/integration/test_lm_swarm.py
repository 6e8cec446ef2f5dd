"""The MoE language model on real node processes: every routing mode gives the local logits, greedy
generation gives the local tokens, nodes and client load a model directory, `moeswarm generate`."""

from __future__ import annotations

import dataclasses
import pathlib
import subprocess
import sys

import pytest
import torch
import yaml

from procs import Proc, ProcGroup, read_until, spawn, start_dht_peer, wait_ready
from moeswarm.model.directory import find_experts
from moeswarm.model.generation import SamplingConfig, generate
from moeswarm.model.lm import build_local_model, open_model, save_model
from moeswarm.model.lm_config import MoELMConfig
from moeswarm.model.routing import RoutingConfig
from moeswarm.protocol.client_dht import IsolatedDHT
from moeswarm.protocol.errors import AllReplicasFailed

SWARM = "lm"
SMALL = dict(d_model=32, n_layers=3, n_heads=4, d_ff=48, d_ff_dense=64, max_seq_len=96)
ROUTINGS = {
    "topk": (RoutingConfig(n_experts=4, k=2), {}),
    "switch": (RoutingConfig(mode="switch", n_experts=4, k=1, capacity_factor=1.0), {}),
    "shared-local": (RoutingConfig(n_experts=4, k=2, n_shared=1), dict(shared_experts_local=True)),
    "shared-remote": (RoutingConfig(n_experts=4, k=2, n_shared=2), dict(shared_experts_local=False)),
    "fine": (RoutingConfig(n_experts=16, k=6), dict(d_ff=16)),
    "soft": (RoutingConfig(mode="soft", n_experts=3, k=3), {}),
    "hier": (RoutingConfig(mode="hierarchical", n_experts=8, n_groups=4, k_groups=2, k=1), {}),
    "dense-first": (RoutingConfig(n_experts=4, k=1), dict(first_dense=1, moe_every=2, n_layers=4)),
}
NO_UPDATES = dict(name="sgd", lr=0.1, update_every=1_000_000_000)


def lm_config(mode: str) -> MoELMConfig:
    routing, extra = ROUTINGS[mode]
    return MoELMConfig(**{**SMALL, **extra}, name=f"lm-{mode}", routing=routing, seed=3)


def node_config(config: MoELMConfig, model_dir: pathlib.Path, peers: list[str], uids: list[str]) -> dict:
    return dict(
        model=config.spec().to_config(), experts=uids, model_dir=str(model_dir), initial_peers=peers, swarm=SWARM, seed=99,
        torch_threads=1, optimizer=NO_UPDATES,
    )


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """One DHT peer and one node per model, started in parallel; each node loads its experts from the
    model directory (seed 99 differs from the model's: weights must come from the directory)."""
    root = tmp_path_factory.mktemp("lm")
    group = ProcGroup()
    try:
        dht = group.add(start_dht_peer(root / "dht"))
        for mode in ROUTINGS:
            config = lm_config(mode)
            save_model(build_local_model(config), root / mode)
            work = root / f"node-{mode}"
            work.mkdir()
            (work / "node.yaml").write_text(yaml.safe_dump(node_config(config, root / mode, dht.ready["maddrs"], config.remote_uids())))
            group.spawn(work, "node", "--config", str(work / "node.yaml"))
        group.wait_ready(timeout_s=150)
        client_dht = IsolatedDHT(dht.ready["maddrs"])  # one client DHT peer for every model of the module
        try:
            yield root, dht.ready["maddrs"], client_dht
        finally:
            client_dht.close()
    finally:
        group.kill()


@pytest.mark.parametrize("mode", list(ROUTINGS))
def test_remote_logits_equal_local_for_every_routing_mode(swarm, mode):
    root, peers, client_dht = swarm
    ids = torch.randint(0, 258, (2, 20), generator=torch.Generator().manual_seed(1))
    local = open_model(root / mode)
    with open_model(root / mode, initial_peers=[], swarm=SWARM, dht=client_dht) as remote:
        remote_logits = remote.model(ids)
        routings = [moe.last_routing for moe in remote.model.moe_layers()]
    local_logits = local.model(ids)
    assert remote_logits.shape == (2, 20, 258)
    assert (remote_logits - local_logits).abs().max().item() <= 1e-5
    aux = local.model.aux_losses()
    assert set(aux) == {"load_balancing", "z_loss", "dropped_fraction"} and torch.isfinite(aux["z_loss"])
    if mode == "switch":  # capacity 1.0 on 40 tokens over 4 experts: some overflow and are dropped
        assert all(r.dropped_fraction > 0 for r in routings)
    if mode == "shared-remote":  # the shared experts were served by the node, not computed here
        assert all(len(moe.shared) == 0 for moe in remote.model.moe_layers())


def test_client_reads_no_routed_expert_weights(swarm):
    root, peers, client_dht = swarm
    with open_model(root / "shared-local", initial_peers=[], swarm=SWARM, dht=client_dht) as remote:
        names = [name for name, _ in remote.model.named_parameters()]
    assert not any(".experts." in name for name in names)
    assert sum(".shared." in name for name in names) == 3 * 3  # 3 MoE layers x w1/w2/w3 of 1 shared expert


@pytest.mark.parametrize("mode", ["topk", "hier", "dense-first"])
def test_greedy_generation_over_the_swarm_equals_local(swarm, mode):
    root, peers, client_dht = swarm
    prompt = torch.tensor([[256, *b"def main():"]])
    sampling = SamplingConfig(max_new_tokens=24)
    local = generate(open_model(root / mode).model, prompt, sampling)
    with open_model(root / mode, initial_peers=[], swarm=SWARM, dht=client_dht) as remote:
        streamed: list[int] = []
        result = generate(remote.model, prompt, sampling, on_tokens=lambda t: streamed.append(t[0]))
    assert result.tokens == local.tokens and streamed == local.tokens[0]
    assert len(result.tokens[0]) == 24 and local.expert_wait_s == 0
    assert 0 < result.prefill_expert_wait_s < result.expert_wait_s and result.decode_expert_wait_s < result.decode_s


def test_node_refuses_a_model_directory_of_another_model(swarm, tmp_path):
    root, peers, client_dht = swarm
    config = lm_config("topk")
    other = vars(config.spec()) | {"d_ff": config.d_ff * 2, "moe_layers": list(config.moe_layers())}
    # Another swarm name: in SWARM the served lm-topk would refuse the node before it reads the directory.
    node = dict(node_config(config, root / "topk", peers, config.remote_uids()[:1]), model=other, swarm="other")
    (tmp_path / "node.yaml").write_text(yaml.safe_dump(node))
    popen = spawn(tmp_path, "node", "--config", str(tmp_path / "node.yaml"))
    assert popen.wait(60) == 2
    log = (tmp_path / "log.txt").read_text()
    assert "holds experts of shape" in log and "d_ff=96" in log and "Traceback" not in log


def test_swarm_up_with_model_and_generate_cli(tmp_path, cli_here):
    """The README's story: model init, swarm up --model, generate; the text equals a local run.
    model init and the local run in this process; swarm up and the swarm's generate as a user runs them."""
    cli = [sys.executable, "-m", "moeswarm.deploy.cli"]
    model_dir = tmp_path / "model"
    init = cli_here(
        "model", "init", str(model_dir), "--routing", "shared", "--set", "d_model=32", "--set", "n_heads=2",
        "--set", "d_ff=32", "--set", "d_ff_dense=64", "--set", "n_layers=2",
    )
    assert init.returncode == 0, init.stderr
    args = ["--model", str(model_dir), "--prompt", "import os\n", "--max-new-tokens", "12"]
    local = cli_here("generate", "--local", *args)
    assert local.returncode == 0, local.stderr
    run_dir = tmp_path / "run"
    up = subprocess.Popen(
        [*cli, "swarm", "up", "--model", str(model_dir), "--nodes", "2", "--replicas", "1", "--placement", "by-layer",
         "--run-dir", str(run_dir)],
        stdout=open(tmp_path / "up.txt", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        text = read_until(up, tmp_path / "up.txt", "Ctrl-C stops the swarm", timeout_s=120)
        peer = next(line.split()[-1] for line in text.splitlines() if line.startswith("initial peers:"))
        endpoints_of_layer = {}  # by-layer placement: each of the 2 MoE layers on one node
        for line in text.splitlines():
            if line.startswith("tiny-moe.L"):
                endpoints_of_layer.setdefault(line.split(".")[1], set()).update(line.split()[1:])
        assert len(endpoints_of_layer) == 2 and all(len(e) == 1 for e in endpoints_of_layer.values()), text
        remote = subprocess.run([*cli, "generate", "--initial-peers", peer, *args], capture_output=True, text=True, timeout=120)
        assert remote.returncode == 0, remote.stderr
        assert remote.stdout == local.stdout and remote.stdout.startswith("import os\n")
        assert "tokens/s decoding" in remote.stderr
    finally:
        up.send_signal(2)
        try:
            up.wait(20)
        finally:
            Proc(up, run_dir, {}).kill()


def test_a_client_keeps_to_the_nodes_serving_its_directory_s_weights_beside_an_impostor(swarm, tmp_path, caplog):
    """A node that loads the same model name and shapes from another directory (another seed) joins:
    the client of the first directory prefers the replicas of its weights, names the other node,
    and its logits stay the local ones."""
    root, peers, client_dht = swarm
    config = lm_config("topk")
    save_model(build_local_model(dataclasses.replace(config, seed=config.seed + 1)), tmp_path / "other")
    (tmp_path / "node").mkdir()
    (tmp_path / "node" / "node.yaml").write_text(yaml.safe_dump(node_config(config, tmp_path / "other", peers, config.remote_uids())))
    impostor = Proc(spawn(tmp_path / "node", "node", "--config", str(tmp_path / "node" / "node.yaml")), tmp_path / "node", {})
    try:
        impostor.ready = wait_ready(impostor.popen, impostor.work_dir)
        ids = torch.randint(0, 258, (4, 24), generator=torch.Generator().manual_seed(2))
        local_logits = open_model(root / "topk").model(ids)
        with open_model(root / "topk", initial_peers=[], swarm=SWARM, dht=client_dht) as remote:
            for uid in config.remote_uids():  # the impostor is announced beside the node of this directory
                assert impostor.ready["endpoint"] in {r.endpoint for r in find_experts(client_dht, SWARM, [uid])[uid]}
            for _ in range(3):  # spread over replicas, the impostor's outputs would show here
                assert (remote.model(ids) - local_logits).abs().max().item() <= 1e-5
        assert f"the node at {impostor.ready['endpoint']} (peer {impostor.ready['peer_id']}) serves lm-topk." in caplog.text
    finally:
        impostor.popen.terminate()  # a clean stop withdraws its records: the other tests see the module's swarm
        impostor.popen.wait(10)


def test_a_model_directory_of_other_shapes_than_the_swarm_s_is_named_at_load(swarm, tmp_path, caplog):
    _, _, client_dht = swarm
    config = dataclasses.replace(lm_config("topk"), d_model=2 * SMALL["d_model"])  # same name, twice as wide
    save_model(build_local_model(config), tmp_path)
    with open_model(tmp_path, initial_peers=[], swarm=SWARM, dht=client_dht):
        assert "1 node(s) of swarm 'lm' serve model 'lm-topk' with other expert shapes" in caplog.text
        assert f"than this one (d_model {2 * SMALL['d_model']}, d_ff" in caplog.text


def test_a_model_nobody_serves_warns_at_load_and_fails_clearly_at_use(swarm, tmp_path, caplog):
    _, _, client_dht = swarm
    config = MoELMConfig(**SMALL, name="lm-unserved", routing=RoutingConfig(n_experts=4, k=2))
    save_model(build_local_model(config), tmp_path)
    with open_model(tmp_path, initial_peers=[], swarm=SWARM, dht=client_dht) as remote:
        assert "12 of 12 experts have no node in swarm 'lm' yet" in caplog.text
        with pytest.raises(AllReplicasFailed, match=r"lm-unserved\.L\d\.E\d failed \(no replica known: "):
            remote.model(torch.tensor([[256, 1, 2]]))
