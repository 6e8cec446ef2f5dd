"""The moeswarm model directory: a JSON manifest (config, tokenizer, which tensors are dense and which
file holds each expert) plus safetensors files. Nodes read only their experts' tensors (memory-mapped);
clients read only the dense file.

    DIR/moeswarm-model.json
    DIR/dense.safetensors             embeddings, attention, norms, gates, dense FFNs, head
    DIR/experts-L001.safetensors      "{uid}.w1.weight", "{uid}.w2.weight", "{uid}.w3.weight" per expert

The manifest keeps the CRC-32 of every tensor's bytes, and readers check each tensor they load:
safetensors notices a file cut short, not a flipped bit, and a damaged copy must not serve wrong
weights silently. (Directories written before the checksums load unchecked.)

The checksums also name where each expert's weights come from (expert_origin): nodes announce it,
and a client loading a directory prefers replicas whose weights started from the same ones
(model/directory.py). A directory saved from a swarm records the origins of the replicas it pulled
(`origins`), so it carries on their line instead of starting one of its own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import secrets
import time

import torch

from moeswarm.model.experts import EXPERT_PARAMS, expert_origin, tensor_crc32
from moeswarm.model.lm_config import MoELMConfig
from moeswarm.model.tokenizer import ByteTokenizer, tokenizer_from_dict
from moeswarm.protocol.durable import fsync_dir
from moeswarm.protocol.errors import ConfigError
from moeswarm.protocol.records import is_origin
from moeswarm.protocol.spec import parse_uid
from moeswarm.protocol.typed_config import build

MANIFEST = "moeswarm-model.json"
FORMAT, VERSION = "moeswarm-model", 1
DENSE_FILE = "dense.safetensors"
CHECKSUMS = "crc32"  # manifest key: file name -> tensor name -> CRC-32 of the tensor's bytes
ORIGINS = "origins"  # manifest key: uid -> origin of the swarm replica its weights were pulled from


@dataclasses.dataclass(frozen=True)
class Manifest:
    path: pathlib.Path
    config: MoELMConfig
    tokenizer: ByteTokenizer
    expert_files: dict[str, str]  # uid -> file name inside the directory
    checksums: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # CHECKSUMS; empty: unchecked
    origins: dict[str, str] = dataclasses.field(default_factory=dict)  # ORIGINS: recorded at a save from a swarm

    def expert_shapes(self) -> dict[str, tuple[int, int]]:
        return expert_shapes(self.config)

    def expert_origins(self) -> dict[str, str]:
        """uid -> origin of each expert's weights: the one recorded when they were pulled from a swarm,
        else the one of its tensors' checksums; "" where the manifest has neither."""
        result = {}
        for uid, file_name in self.expert_files.items():
            crcs = self.checksums.get(file_name, {})
            names = [f"{uid}.{name}" for name in EXPERT_PARAMS]
            computed = expert_origin(uid, [crcs[name] for name in names]) if all(name in crcs for name in names) else ""
            result[uid] = self.origins.get(uid) or computed
        return result


def expert_shapes(config: MoELMConfig) -> dict[str, tuple[int, int]]:
    """Parameter name -> shape of each expert of the model (the keys of EXPERT_PARAMS)."""
    D, F = config.d_model, config.d_ff
    return {"w1.weight": (F, D), "w3.weight": (F, D), "w2.weight": (D, F)}


def _expert_file(uid: str) -> str:
    return f"experts-L{parse_uid(uid).layer:03d}.safetensors"


_TEMP_RE = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")  # _write_temp's names


def _write_temp(path: pathlib.Path, write) -> pathlib.Path:
    """write(temp path) beside `path` under a name no other writer uses, fsync it; returns the temp
    path, for the caller to rename over `path`. A failed write leaves no temp file."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        tmp.chmod(0o644)  # nodes may run as another user (deploy/moeswarm-node.service)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


STALE_TEMP_S = 3600.0  # a temp file untouched this long is what a killed save left behind


def _remove_stale_temps(path: pathlib.Path) -> None:
    """Delete the temp files of saves that were killed (kill -9, power loss): a model's worth of disk.
    Recent ones may belong to a save in progress, and stay."""
    now = time.time()
    for tmp in path.glob(".*.tmp"):
        try:
            if _TEMP_RE.fullmatch(tmp.name) and now - tmp.stat().st_mtime > STALE_TEMP_S:
                tmp.unlink()
        except OSError:  # gone meanwhile, or not ours to remove: the save goes on
            pass


def _tensors_to_temp(tensors: dict[str, torch.Tensor], path: pathlib.Path) -> tuple[pathlib.Path, dict[str, int]]:
    """Write `tensors` to a temp file for `path`; returns it and the CRC-32 of each tensor's bytes."""
    from safetensors.torch import save_file

    contiguous = {name: tensor.detach().contiguous() for name, tensor in tensors.items()}
    tmp = _write_temp(path, lambda tmp: save_file(contiguous, str(tmp)))
    return tmp, {name: tensor_crc32(tensor) for name, tensor in contiguous.items()}


def save_model_dir(
    path: str | pathlib.Path, config: MoELMConfig, dense: dict[str, torch.Tensor], experts: dict[str, dict[str, torch.Tensor]],
    tokenizer: ByteTokenizer = ByteTokenizer(), origins: dict[str, str] | None = None,
) -> pathlib.Path:
    """Write a model directory. Every file is written under a temp name and renamed into place only
    once all of them are on disk, the manifest last: a save cut short leaves the model that was there
    whole (within the milliseconds of the renames, no manifest: never a readable mix of the two).
    `experts` maps every UID of config.spec() to its w1/w2/w3 weights; `origins`, the origin of
    those pulled from a swarm replica (ExpertRecord.origin; "" where it announced none)."""
    path = pathlib.Path(path)
    check_vocab(config, tokenizer)
    path.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    missing = sorted(set(config.spec().all_uids()) - set(experts))
    if missing:
        raise ValueError(f"experts missing from the model to save: {missing[:4]}{'...' if len(missing) > 4 else ''}")
    by_file: dict[str, dict[str, torch.Tensor]] = {DENSE_FILE: dense}
    for uid, weights in experts.items():
        by_file.setdefault(_expert_file(uid), {}).update({f"{uid}.{name}": weights[name] for name in EXPERT_PARAMS})
    # Every file goes to a temp name first, so an interrupted save (Ctrl-C, a full disk, kill -9)
    # leaves the model that was there readable and whole; only the renames below replace it.
    temps: dict[str, pathlib.Path] = {}
    checksums: dict[str, dict[str, int]] = {}
    try:
        for name, tensors in sorted(by_file.items()):
            temps[name], checksums[name] = _tensors_to_temp(tensors, path / name)
        manifest = {
            "format": FORMAT, "version": VERSION, "config": config.to_dict(), "tokenizer": tokenizer.to_dict(),
            "dense": DENSE_FILE, "experts": {uid: _expert_file(uid) for uid in sorted(experts)}, CHECKSUMS: checksums,
        }
        if recorded := {uid: origin for uid, origin in sorted((origins or {}).items()) if origin}:
            manifest[ORIGINS] = recorded
        temps[MANIFEST] = _write_temp(path / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
        fsync_dir(path)  # every new file is on disk before any replaces an old one
        (path / MANIFEST).unlink(missing_ok=True)  # no manifest while old and new files mix (milliseconds)
        for name, tmp in temps.items():  # the manifest last (dicts keep insertion order)
            if name == MANIFEST:
                fsync_dir(path)  # the tensor files are in place before a manifest names them
            os.replace(tmp, path / name)
    except BaseException:
        for tmp in temps.values():  # (those already renamed are gone from their temp names)
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path)
    return path


def check_vocab(config: MoELMConfig, tokenizer: ByteTokenizer) -> None:
    """ConfigError where the embedding has fewer rows than the tokenizer has tokens (its ids would index past it)."""
    if config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"vocab_size={config.vocab_size}: must be at least the tokenizer's {tokenizer.vocab_size} tokens")


def read_manifest(path: str | pathlib.Path) -> Manifest:
    """Parse and check a model directory's manifest; ConfigError says what is wrong."""
    path = pathlib.Path(path)
    try:
        data = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError as e:
        if (path / "config.json").exists():
            raise ConfigError(
                f"{path} is a Hugging Face checkpoint, not a moeswarm model directory ({MANIFEST} is missing): "
                "nodes serve its experts (`moeswarm node --model`, `swarm up --model`), and Python runs it with "
                "moeswarm.model.from_pretrained(DIR, initial_peers=[...]) and `moeswarm generate --model DIR`"
            ) from e
        if not path.is_dir():
            raise ConfigError(f"{path}: no such folder") from e
        raise ConfigError(
            f"{path} is not a model folder: it holds neither {MANIFEST} (a moeswarm model directory, "
            "`moeswarm model init`) nor config.json (a Hugging Face checkpoint)"
        ) from e
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path / MANIFEST}: {e}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise ConfigError(f"{path / MANIFEST}: expected format {FORMAT!r} version {VERSION}")
    try:
        config = build(MoELMConfig, data.get("config"), "config.")
    except ConfigError as e:
        raise ConfigError(f"{path / MANIFEST}: {e}") from e
    try:
        tokenizer = tokenizer_from_dict(data.get("tokenizer"))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path / MANIFEST}: {e}") from e
    try:
        check_vocab(config, tokenizer)
    except ConfigError as e:
        raise ConfigError(f"{path / MANIFEST}: {e}") from e
    expert_files = data.get("experts")
    if not isinstance(expert_files, dict):
        raise ConfigError(f"{path / MANIFEST}: 'experts' must map each expert UID to its file")
    uids = set(config.spec().all_uids())
    if set(expert_files) != uids:
        missing, extra = sorted(uids - set(expert_files)), sorted(set(expert_files) - uids)
        differ = f"no file for {missing[0]}" if missing else f"{extra[0]} is not an expert of this config"
        raise ConfigError(
            f"{path / MANIFEST}: 'experts' must list exactly the UIDs of model {config.name!r} ({differ}); "
            "was its config (n_layers, routing) edited?"
        )
    for uid, name in expert_files.items():
        if not isinstance(name, str) or name in ("", ".", "..") or pathlib.PurePath(name).name != name:
            raise ConfigError(f"{path / MANIFEST}: expert {uid} is in {name!r}, which is not a file name in {path}; write the directory again")
    checksums = data.get(CHECKSUMS, {})
    if not isinstance(checksums, dict) or not all(
        isinstance(crcs, dict) and all(isinstance(crc, int) for crc in crcs.values()) for crcs in checksums.values()
    ):
        raise ConfigError(f"{path / MANIFEST}: {CHECKSUMS!r} must map each file to {{tensor name: CRC-32}}; write the directory again")
    origins = data.get(ORIGINS, {})
    if not isinstance(origins, dict) or not all(uid in uids and is_origin(origin) for uid, origin in origins.items()):
        raise ConfigError(f"{path / MANIFEST}: {ORIGINS!r} must map experts of the model to 16 hex digits; write the directory again")
    return Manifest(path, config, tokenizer, dict(expert_files), checksums, dict(origins))


def load_expert_weights(manifest: Manifest, uids: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Read only these experts' tensors (memory-mapped files, one slice each); checks their shapes.
    ConfigError names the file for a missing, unreadable or truncated file, or a tensor not in it."""
    by_file: dict[str, list[str]] = {}
    for uid in uids:
        if uid not in manifest.expert_files:
            raise ConfigError(f"expert {uid!r} is not in model directory {manifest.path}")
        by_file.setdefault(manifest.expert_files[uid], []).append(uid)
    shapes = manifest.expert_shapes()
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for file_name, file_uids in by_file.items():
        with open_safetensors(manifest.path / file_name) as f:
            present = set(f.keys())
            for uid in file_uids:
                absent = [f"{uid}.{name}" for name in EXPERT_PARAMS if f"{uid}.{name}" not in present]
                if absent:
                    raise ConfigError(
                        f"{manifest.path / file_name} holds no tensor {absent[0]}, though {MANIFEST} puts expert "
                        f"{uid} in this file; write the directory again"
                    )
                weights[uid] = {name: _checked(manifest, file_name, f"{uid}.{name}", f.get_tensor(f"{uid}.{name}")) for name in EXPERT_PARAMS}
                for name, tensor in weights[uid].items():
                    if tuple(tensor.shape) != shapes[name]:
                        raise ConfigError(
                            f"{manifest.path / file_name}: {uid}.{name} has shape {list(tensor.shape)}, "
                            f"expected {list(shapes[name])}"
                        )
    return weights


def load_dense_weights(manifest: Manifest) -> dict[str, torch.Tensor]:
    """Every dense tensor; ConfigError names the file if it is missing, unreadable or truncated."""
    with open_safetensors(manifest.path / DENSE_FILE) as f:
        return {name: _checked(manifest, DENSE_FILE, name, f.get_tensor(name)) for name in f.keys()}


def _checked(manifest: Manifest, file_name: str, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, after checking it against the CRC-32 the manifest recorded for it (if any)."""
    expected = manifest.checksums.get(file_name, {}).get(name)
    if expected is not None and tensor_crc32(tensor) != expected:
        raise ConfigError(
            f"{manifest.path / file_name}: tensor {name} does not match the checksum {MANIFEST} recorded "
            "when the directory was written (the file was damaged since); copy or write the directory again"
        )
    return tensor


def open_safetensors(path: pathlib.Path, redo: str = "copy or write the directory again"):
    """safe_open(path) (memory-mapped), with a ConfigError naming the file instead of safetensors' or
    the OS's error: a file left out of a copy, or cut short by one. `redo`: what fixes that."""
    from safetensors import SafetensorError, safe_open

    if path.is_dir():  # safe_open says "No such device"
        raise ConfigError(f"{path} is a directory, not a safetensors file; {redo}")
    try:
        return safe_open(str(path), framework="pt")
    except FileNotFoundError as e:
        raise ConfigError(f"{path} is missing; {redo}") from e
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from e
    except SafetensorError as e:
        raise ConfigError(f"{path} is not a complete safetensors file ({e}); {redo}") from e
