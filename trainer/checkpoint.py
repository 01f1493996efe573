"""Checkpoints that can be resumed without unpickling anything.

RUN/checkpoints/step-00001000/
    transformer/                 diffusers `save_pretrained` folder (config.json + safetensors): loads in PRXPipeline
    optimizer.safetensors        AdamW state tensors, named state.{param index}.{exp_avg|exp_avg_sq|step}
    rng-rank{R}.safetensors      torch CPU RNG, the objective's generator, CUDA RNG (uint8 state tensors)
    state.json                   step, optimizer hyper-parameters, config hash, counters
    loader-rank{R}.json          the loader's exact position after the last batch trained on: a few integers per
                                 source (open shards, offsets, shuffle block), draw counters, counts (see trainer.data)
A checkpoint is written under a temporary name and renamed when complete; `latest()` only sees complete ones.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CKPT_RE = re.compile(r"step-(\d{8})")


def ckpt_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step-{step:08d}")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = CKPT_RE.fullmatch(name)
        if m and os.path.exists(os.path.join(root, name, "state.json")):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def latest(run_dir: str) -> str | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (safetensors) and plain values (JSON)."""
    sd = optimizer.state_dict()
    tensors, plain = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                plain[f"{idx}.{k}"] = v
    groups = []
    for g in sd["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    return tensors, {"param_groups": groups, "plain_state": plain}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        _, idx, k = name.split(".", 2)
        state.setdefault(int(idx), {})[k] = t
    for name, v in meta.get("plain_state", {}).items():
        idx, k = name.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors(generator: torch.Generator) -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state(), "objective": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    generator.set_state(tensors["objective"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda")), key=lambda k: int(k[4:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def tmp_dir(run_dir: str, step: int) -> str:
    path = os.path.join(run_dir, "checkpoints", f".tmp-step-{step:08d}")
    return path


def write_rank_files(tmp: str, rank: int, generator: torch.Generator, loader_state: dict[str, Any]) -> None:
    """What every DDP rank saves for itself (its RNG and its loader position)."""
    os.makedirs(tmp, exist_ok=True)
    save_file(rng_tensors(generator), os.path.join(tmp, f"rng-rank{rank}.safetensors"))
    with open(os.path.join(tmp, f"loader-rank{rank}.json"), "w") as fh:
        json.dump(loader_state, fh)


def write_main(tmp: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Rank 0's part: weights, optimizer, state.json (written last)."""
    os.makedirs(tmp, exist_ok=True)
    model.save_pretrained(os.path.join(tmp, "transformer"), safe_serialization=True)
    tensors, meta = optimizer_tensors(optimizer)
    save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
    with open(os.path.join(tmp, "optimizer.json"), "w") as fh:
        json.dump(meta, fh)
    with open(os.path.join(tmp, "state.json"), "w") as fh:
        json.dump(state, fh, indent=2)


def publish(run_dir: str, step: int, keep: int = 0) -> str:
    """Rename the finished temporary folder into place; drop old checkpoints beyond `keep`."""
    final = ckpt_dir(run_dir, step)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp_dir(run_dir, step), final)
    if keep > 0:
        for _, path in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Weights from a checkpoint's transformer/ folder (safetensors only)."""
    folder = os.path.join(path, "transformer")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors weights")
    sd = {}
    for f in files:
        sd.update(load_file(os.path.join(folder, f)))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def load(path: str, rank: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         generator: torch.Generator) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore model, optimizer and RNG in place; returns (state.json, this rank's loader state)."""
    with open(os.path.join(path, "state.json")) as fh:
        state = json.load(fh)
    load_weights(model, path)
    with open(os.path.join(path, "optimizer.json")) as fh:
        meta = json.load(fh)
    load_optimizer(optimizer, load_file(os.path.join(path, "optimizer.safetensors")), meta)
    rng_path = os.path.join(path, f"rng-rank{rank}.safetensors")
    if not os.path.exists(rng_path):
        raise FileNotFoundError(f"{path} has no state for rank {rank}: resume with the same number of processes "
                                f"({state.get('world_size')})")
    restore_rng(load_file(rng_path), generator)
    with open(os.path.join(path, f"loader-rank{rank}.json")) as fh:
        loader_state = json.load(fh)
    return state, loader_state
