"""Checkpoints that can be resumed without unpickling anything.

RUN/checkpoints/step-00001000/
    transformer/                 diffusers `save_pretrained` folder (config.json + safetensors): loads in PRXPipeline
    transformer_ema/             the EMA weights, same format (only when --ema-decay > 0)
    aux.safetensors              auxiliary modules, never inside transformer/: `repa_projector.*` (REPA, training
                                 only), `sprint_fusion.*` (SPRINT: part of the model at inference too), and their
                                 EMA as `ema.sprint_fusion.*` (only when a run has such modules)
    optimizer.safetensors        each optimizer's state tensors under its own prefix:
                                 {adamw|muon}.state.{param index}.{exp_avg|exp_avg_sq|step|momentum_buffer}
    optimizer.json               {adamw|muon: param groups and non-tensor state}
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


def optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An `Optimizers` (trainer.optim) as tensors `{name}.state.{idx}.{key}` and JSON `{name: {...}}`."""
    members = getattr(optimizer, "members", None) or {"adamw": optimizer}
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for name, opt in members.items():
        t, m = _one_optimizer_tensors(opt)
        tensors.update({f"{name}.{k}": v for k, v in t.items()})
        meta[name] = m
    return tensors, meta


def load_optimizer(optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    members = getattr(optimizer, "members", None) or {"adamw": optimizer}
    if "param_groups" in meta:  # a checkpoint written before per-optimizer prefixes: AdamW only
        meta, tensors = {"adamw": meta}, {f"adamw.{k}": v for k, v in tensors.items()}
    if set(meta) != set(members):
        raise ValueError(f"the checkpoint holds optimizer state for {sorted(meta)}, this run uses {sorted(members)}: "
                         "resume with the same --optimizer")
    for name, opt in members.items():
        prefix = f"{name}."
        _load_one_optimizer(opt, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, meta[name])


def _one_optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
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


def _load_one_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                        meta: dict[str, Any]) -> None:
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
        for key in ("betas", "ns_coefficients"):
            if key in g:
                g[key] = tuple(g[key])
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


def aux_tensors(denoiser, ema=None) -> dict[str, torch.Tensor]:
    """The auxiliary modules' state (`{module}.{name}`) and their EMA (`ema.{module}.{name}`)."""
    out = {k: v.detach().cpu().contiguous() for k, v in denoiser.aux.state_dict().items()} if denoiser else {}
    if ema is not None:
        out.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.tensors("aux.").items()})
    return out


def load_aux(path: str, denoiser, ema=None) -> None:
    """Restore the auxiliary modules (and their EMA) from `path/aux.safetensors`; both sides must agree."""
    file = os.path.join(path, "aux.safetensors")
    tensors = load_file(file) if os.path.exists(file) else {}
    have = {k.split(".", 1)[0] for k in tensors if not k.startswith("ema.")}
    want = set(denoiser.aux.keys()) if denoiser is not None else set()
    if have != want:
        raise ValueError(f"{path} has auxiliary modules {sorted(have) or 'none'}, this run builds {sorted(want) or 'none'}"
                         ": resume with the same --repa-weight / --routing as the run that wrote it")
    if want:
        denoiser.aux.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("ema.")}, strict=True)
    if ema is not None:
        ema.load({k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}, prefix="aux.")


def write_main(tmp: str, model: torch.nn.Module, optimizer, state: dict[str, Any], denoiser=None,
               ema=None) -> None:
    """Rank 0's part: weights (raw, EMA, auxiliary), optimizer, state.json (written last)."""
    os.makedirs(tmp, exist_ok=True)
    model.save_pretrained(os.path.join(tmp, "transformer"), safe_serialization=True)
    if ema is not None:
        with ema.applied(denoiser):
            model.save_pretrained(os.path.join(tmp, "transformer_ema"), safe_serialization=True)
    aux = aux_tensors(denoiser, ema)
    if aux:
        save_file(aux, os.path.join(tmp, "aux.safetensors"), metadata={"modules": ",".join(denoiser.aux.keys())})
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


def read_weights(path: str, sub: str = "transformer") -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's transformer/ (or transformer_ema/) folder (safetensors only)."""
    folder = os.path.join(path, sub)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) if os.path.isdir(folder) else []
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors weights")
    sd = {}
    for f in files:
        sd.update(load_file(os.path.join(folder, f)))
    return sd


def load_weights(model: torch.nn.Module, path: str, sub: str = "transformer") -> None:
    """Weights from a checkpoint's transformer/ (or transformer_ema/) folder into `model`."""
    folder = os.path.join(path, sub)
    sd = read_weights(path, sub)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def load(path: str, rank: int, model: torch.nn.Module, optimizer, generator: torch.Generator, denoiser=None,
         ema=None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore model (+ auxiliary modules, EMA), optimizer and RNG in place; returns (state.json, this rank's
    loader state)."""
    with open(os.path.join(path, "state.json")) as fh:
        state = json.load(fh)
    load_weights(model, path)
    load_aux(path, denoiser, ema)
    if ema is not None:
        if not os.path.isdir(os.path.join(path, "transformer_ema")):
            raise ValueError(f"{path} has no transformer_ema/: it was written without --ema-decay; resume with the "
                             "same --ema-decay as the run that wrote it")
        ema.load(read_weights(path, "transformer_ema"), prefix="transformer.")
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


# ------------------------------------------------------------------------------------------- fine-tune start
def resolve_parent(init_from: str) -> tuple[str, str]:
    """`--init-from RUN|CHECKPOINT` -> (checkpoint folder, run folder)."""
    if os.path.exists(os.path.join(init_from, "state.json")):
        return init_from, os.path.dirname(os.path.dirname(os.path.abspath(init_from)))
    found = latest(init_from) if os.path.isdir(init_from) else None
    if found is None:
        raise FileNotFoundError(f"--init-from {init_from}: neither a checkpoint folder (step-N/ with state.json) nor a "
                                "run folder with a complete checkpoint")
    return found, init_from


def _same_encoder(a: dict, b: dict) -> bool:
    return (a.get("id"), a.get("revision"), a.get("subfolder")) == (b.get("id"), b.get("revision"), b.get("subfolder"))


def load_parent(init_from: str, weights: str, denoiser, vae: dict, text_encoder: dict) -> dict[str, Any]:
    """Fine-tune start: the parent's weights (raw or EMA) into `denoiser`, after checking that the parent has the
    same architecture and was trained on shards from the same encoders. Returns the record of the parent."""
    ckpt, run_dir = resolve_parent(init_from)
    sub = "transformer_ema" if weights == "ema" else "transformer"
    if not os.path.isdir(os.path.join(ckpt, sub)):
        raise FileNotFoundError(f"--init-from {init_from}: {ckpt} has no {sub}/ (EMA weights exist only for runs "
                                "trained with --ema-decay > 0); use --init-weights raw")
    with open(os.path.join(ckpt, sub, "config.json")) as fh:
        parent_cfg = json.load(fh)
    mine = dict(denoiser.transformer.config)
    diff = sorted(k for k in mine if not k.startswith("_") and k in parent_cfg and parent_cfg[k] != mine[k])
    if diff:
        raise ValueError(f"--init-from {init_from}: another architecture ({', '.join(f'{k} {parent_cfg[k]} vs {mine[k]}' for k in diff)}); "
                         "use the parent's --model, or train from scratch")
    data_file = os.path.join(run_dir, "data.json")
    if not os.path.exists(data_file):
        raise FileNotFoundError(f"--init-from {init_from}: {data_file} is missing, so the parent's encoders are unknown")
    with open(data_file) as fh:
        parent_data = json.load(fh)
    for label, key, now in (("VAE", "vae", vae), ("text encoder", "text_encoder", text_encoder)):
        if not _same_encoder(parent_data.get(key) or {}, now or {}):
            raise ValueError(f"--init-from {init_from}: the parent was trained on shards from another {label} "
                             f"({(parent_data.get(key) or {}).get('id')} vs {(now or {}).get('id')}): fine-tune on "
                             "shards encoded with the parent's encoders")
    load_weights(denoiser.transformer, ckpt, sub)
    file = os.path.join(ckpt, "aux.safetensors")
    parent_aux = load_file(file) if os.path.exists(file) else {}
    prefix = "ema.sprint_fusion." if weights == "ema" and any(k.startswith("ema.") for k in parent_aux) \
        else "sprint_fusion."
    fusion = {k[len(prefix):]: v for k, v in parent_aux.items() if k.startswith(prefix)}
    if fusion and "sprint_fusion" not in denoiser.aux:
        raise ValueError(f"--init-from {init_from}: the parent was trained with --routing sprint, whose fusion layer is "
                         "part of the model; fine-tune it with --routing sprint too")
    if fusion:
        denoiser.aux["sprint_fusion"].load_state_dict({**denoiser.aux["sprint_fusion"].state_dict(), **fusion})
    with open(os.path.join(ckpt, "state.json")) as fh:
        step = json.load(fh).get("step")
    return {"init_from": os.path.abspath(ckpt), "run": os.path.abspath(run_dir), "step": step, "weights": weights}
