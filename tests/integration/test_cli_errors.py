"""Bad input to the `moeswarm` CLI ends in one line naming what is wrong (exit 2), not a traceback.
Each case fails before any network is needed, so most run `cli.main` in this process (conftest.py cli_here) (a subprocess
apiece cost about 1.5 s of imports, 30 s in all); the cases in SUBPROCESS go through the console entry
point as a user's shell does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from moeswarm.model.lm import build_local_model, save_model
from moeswarm.model.lm_config import MoELMConfig, RoutingConfig


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moeswarm.deploy.cli", *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, **(env or {})},
    )


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, fragment: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code and len(lines) == 1, result.stderr
    assert lines[0].startswith("moeswarm: ") and fragment in lines[0], lines[0]


def fake_mixtral(path, **config) -> str:
    """A Mixtral checkpoint as far as the reader looks before reading an expert: config.json and the
    tensors of layer 0's expert 0 (H=8, F=4)."""
    path.mkdir()
    base = dict(model_type="mixtral", hidden_size=8, num_hidden_layers=1, intermediate_size=4, num_local_experts=2,
                num_experts_per_tok=1)
    (path / "config.json").write_text(json.dumps({**base, **config}))
    expert = "model.layers.0.block_sparse_moe.experts.0"
    weights = {f"{expert}.w1.weight": torch.zeros(4, 8), f"{expert}.w3.weight": torch.zeros(4, 8),
               f"{expert}.w2.weight": torch.zeros(8, 4)}
    save_file(weights, str(path / "model.safetensors"))
    return str(path)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli")
    config = MoELMConfig(d_model=16, n_layers=2, n_heads=2, d_ff=16, d_ff_dense=32, max_seq_len=128,
                         routing=RoutingConfig(n_experts=2, k=1))
    model = build_local_model(config)
    save_model(model, root / "model")
    save_model(model, root / "damaged")
    (root / "damaged" / "experts-L001.safetensors").unlink()
    truncated = root / "truncated-hf"
    fake_mixtral(truncated)
    (truncated / "model.safetensors").write_bytes((truncated / "model.safetensors").read_bytes()[:200])
    (root / "file").write_text("")
    return {"model": str(root / "model"), "damaged": str(root / "damaged"), "hf": fake_mixtral(root / "hf"),
            "hf-eight": fake_mixtral(root / "hf-eight", num_local_experts="eight"), "truncated-hf": str(truncated),
            "hf-str": fake_mixtral(root / "hf-str", hidden_size="8"), "hf-top3": fake_mixtral(root / "hf-top3", num_experts_per_tok=3),
            "hf-quant-str": fake_mixtral(root / "hf-quant-str", quantization_config="fp8"),
            "file": str(root / "file")}


UNREACHABLE = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWMFLAPhNuYmXyx1nFGyFAQqq6VU3FP2sngeZ9v5f7L3Gk"  # never dialled: the error comes first
CASES = [  # (arguments, with {name} for a folder of `dirs`; what the error must say)
    ("generate --local --model {model} --prompt hi --max-new-tokens 100000",
     "--max-new-tokens 100000: the 3-token prompt leaves room for at most 125 (the model's max_seq_len is 128)"),
    ("generate --local --model {model} --max-new-tokens 1 --prompt " + "a" * 130, "--prompt is 131 tokens"),
    ("generate --local --model {model} --prompt hi --threads 0", "--threads 0: must be at least 1"),
    ("generate --local --model {model} --prompt hi --timeout 0", "--timeout 0.0: must be a positive number of seconds"),
    ("generate --local --model {damaged} --prompt hi", "experts-L001.safetensors is missing; copy or write the directory again"),
    ("generate --local --model {hf} --prompt hi", "transformers cannot load its tokenizer"),
    ("node --model {truncated-hf}", "model.safetensors is not a complete safetensors file"),
    ("node --model {hf-eight}", "config.json num_local_experts='eight': must be a positive integer"),
    # transformers' config classes raise tracebacks for these (the tokenizer reads config.json too)
    ("generate --model {hf-str} --prompt hi --initial-peers " + UNREACHABLE, "config.json hidden_size='8': must be a positive integer"),
    ("generate --local --model {hf-str} --prompt hi", "transformers cannot read its config.json (Validation error for field 'hidden_size'"),
    ("generate --model {hf-top3} --prompt hi --initial-peers " + UNREACHABLE, "routes each token to 3 experts, but a layer has only 2"),
    ("node --model {hf-top3}", "routes each token to 3 experts, but a layer has only 2"),
    ("node --model {hf-quant-str}", "quantized checkpoints (fp8) are not supported"),
    ("node --model {model} --set port=[1", "--set 'port=[1': '[1' is not valid YAML"),
    ("dht --identity /nonexistent/dir/key", "--identity /nonexistent/dir/key: cannot create /nonexistent/dir/key.lock"),
    ("dht --port -1", "--port -1: must be in [0, 65535]"),
    ("model init {file}", "exists and is not a folder"),
    ("model init {hf}", "is not empty and holds no moeswarm model (it holds a Hugging Face checkpoint)"),
    ("model init /proc/moeswarm-model", "cannot write the model directory /proc/moeswarm-model"),
]


# Through `python -m moeswarm.deploy.cli`: one case of each kind of command (parse-time, node, generate's
# import of torch under the exit-at-once handlers)
SUBPROCESS = {"dht --port -1", "node --model {hf-eight}", "generate --local --model {model} --prompt hi --threads 0"}


@pytest.mark.parametrize(("command", "message"), CASES, ids=[command.split(" --prompt")[0] for command, _ in CASES])
def test_bad_input_is_one_line_naming_it(dirs, cli_here, command, message):
    args = [arg.format(**dirs) if arg.startswith("{") else arg for arg in command.split()]
    checkpoint = sorted(os.listdir(dirs["hf"]))
    assert_one_line_error((cli if command in SUBPROCESS else cli_here)(*args), 2, message)
    assert sorted(os.listdir(dirs["hf"])) == checkpoint  # `model init` wrote nothing into it


def test_an_empty_expert_spec_is_refused_not_taken_as_every_expert(dirs, cli_here):
    """`--experts "$SPEC"` with SPEC unset must not start a node that loads the whole checkpoint."""
    assert_one_line_error(cli_here("node", "--model", dirs["hf"], "--experts", " "), 2, "cannot parse expert spec ' '")
    assert_one_line_error(cli_here("node", "--model", dirs["hf"], "--experts", ""), 2, "cannot parse expert spec ''")

