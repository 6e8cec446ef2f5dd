"""The examples in examples/ run against a real local swarm and do what they say."""

from __future__ import annotations

import importlib.util
import pathlib

from moeswarm.deploy.swarm import LocalSwarm, SwarmPlan

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vmoe_patches_learn_through_remote_experts(tmp_path):
    vmoe = load_example("vmoe_patches")
    with LocalSwarm(SwarmPlan(model=vmoe.SPEC, nodes=2, replicas=1, swarm="vmoe", run_dir=tmp_path)) as swarm:
        losses = vmoe.train(swarm.initial_peers, steps=12, batch=16, swarm="vmoe")
    assert len(losses) == 12 and losses[-1] < losses[0] / 3, losses


def test_vmoe_patches_refuses_a_bad_size_and_ends_quietly_on_ctrl_c(monkeypatch, capsys):
    import pytest

    vmoe = load_example("vmoe_patches")
    monkeypatch.setattr("sys.argv", ["vmoe_patches.py", "--batch", "0"])
    with pytest.raises(SystemExit) as exit_:
        vmoe.main()
    assert exit_.value.code == 2 and "--batch must be at least 1" in capsys.readouterr().err

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(vmoe, "train", interrupted)
    monkeypatch.setattr("sys.argv", ["vmoe_patches.py", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/QmX"])
    with pytest.raises(SystemExit) as exit_:
        vmoe.main()  # before: the KeyboardInterrupt's traceback
    assert exit_.value.code == 130 and capsys.readouterr().err == "interrupted\n"


def test_train_lm_learns_stdlib_bytes_and_saves_the_model(tmp_path):
    import torch

    from moeswarm.deploy.model_cli import config_from_args
    from moeswarm.model.corpus import stdlib_sources
    from moeswarm.model.lm import build_local_model, open_model, save_model

    config = config_from_args("tiny-train", "tiny", "shared", ["d_model=32", "n_heads=2", "n_layers=2", "d_ff=32"])
    save_model(build_local_model(config), tmp_path)
    before = open_model(tmp_path).model.embed.weight.clone()
    losses = load_example("train_lm").train(str(tmp_path), steps=25, batch=8, length=32, lr=1e-2)
    assert sum(losses[-5:]) / 5 < 0.75 * losses[0], losses  # from ~ln(258) = 5.55 towards byte statistics
    assert not torch.equal(open_model(tmp_path).model.embed.weight, before)  # the trained weights were saved
    assert len(stdlib_sources(1 << 16)) == 1 << 16


def test_train_lm_on_the_swarm_trains_the_nodes_experts_and_saves_them(tmp_path):
    import torch

    from moeswarm.deploy.model_cli import config_from_args
    from moeswarm.model.lm import build_local_model, expert_weights, open_model, save_model

    config = config_from_args("tiny-swarm-train", "tiny", "topk", ["d_model=32", "n_heads=2", "n_layers=2", "d_ff=32"])
    model_dir = saved_dir = tmp_path / "model"  # train_lm saves back into the directory it trained
    save_model(build_local_model(config), model_dir)
    initial = expert_weights(open_model(model_dir).model)
    # One replica per expert: the logits over the swarm then come from the very weights that are saved.
    plan = SwarmPlan(model=config.spec(), model_dir=str(model_dir), nodes=2, replicas=1, run_dir=tmp_path / "run")
    with LocalSwarm(plan) as swarm:
        losses = load_example("train_lm").train(
            str(model_dir), steps=15, batch=8, length=32, lr=1e-2, initial_peers=swarm.initial_peers
        )
        x_BT = torch.randint(0, 256, (2, 24))
        with open_model(saved_dir, initial_peers=swarm.initial_peers) as remote, torch.no_grad():
            remote_logits = remote.model(x_BT)
    assert sum(losses[-5:]) / 5 < 0.9 * losses[0], losses
    saved = open_model(saved_dir).model
    with torch.no_grad():
        assert (saved(x_BT) - remote_logits).abs().max() <= 1e-5  # the saved experts are the nodes' trained ones
    trained = expert_weights(saved)
    moved = [uid for uid in initial if not torch.equal(trained[uid]["w1.weight"], initial[uid]["w1.weight"])]
    assert len(moved) > len(initial) // 2, moved  # the nodes' experts learned, and were pulled back


def test_train_lm_interrupted_by_ctrl_c_saves_the_steps_it_took(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch

    from moeswarm.deploy.model_cli import config_from_args
    from moeswarm.model.lm import build_local_model, open_model, save_model

    config = config_from_args("tiny-ctrl-c", "tiny", "topk", ["d_model=32", "n_heads=2", "n_layers=2", "d_ff=32"])
    save_model(build_local_model(config), tmp_path / "model")
    before = open_model(tmp_path / "model").model.embed.weight.clone()
    output = tmp_path / "output.txt"
    with open(output, "wb") as out:
        train = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "train_lm.py"), str(tmp_path / "model"), "--steps", "100000", "--batch", "2", "--length", "16"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while "step   25" not in output.read_text() and train.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        os.killpg(train.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        assert train.wait(60) == 130, output.read_text()
    finally:
        if train.poll() is None:
            os.killpg(train.pid, signal.SIGKILL)
            train.wait(10)
    text = output.read_text()
    assert "interrupted after" in text and "Traceback" not in text, text
    assert not torch.equal(open_model(tmp_path / "model").model.embed.weight, before)  # the steps taken were saved


def test_train_lm_explains_a_bad_option_or_folder_in_one_line(tmp_path, monkeypatch, capsys):
    import pytest

    from moeswarm.deploy.model_cli import config_from_args
    from moeswarm.model.lm import build_local_model, save_model

    config = config_from_args("tiny-bad-args", "tiny", "topk", ["d_model=32", "n_heads=2", "n_layers=2", "d_ff=32"])
    save_model(build_local_model(config), tmp_path / "model")
    cases = {
        (str(tmp_path / "missing"),): "no such folder",
        (str(tmp_path / "model"), "--steps", "0"): "--steps: must be > 0",
        (str(tmp_path / "model"), "--lr", "nan"): "--lr: must be > 0",
        (str(tmp_path / "model"), "--length", "100000"): "longer than the model's max_seq_len",
    }
    train_lm = load_example("train_lm")  # in this process: an exception other than the exit fails the test
    for args, message in cases.items():
        monkeypatch.setattr("sys.argv", ["train_lm.py", *args])
        with pytest.raises(SystemExit) as exit_:
            train_lm.main()
        stderr = capsys.readouterr().err
        assert exit_.value.code == 2 and message in stderr, (args, stderr)
