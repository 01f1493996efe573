"""Checkpoints that can be resumed without unpickling anything.

RUN/checkpoints/step-00001000/
    transformer/                 diffusers `save_pretrained` folder (config.json + safetensors): loads in PRXPipeline
    transformer_ema/             the EMA weights, same format (only when --ema-decay > 0): an algorithm's state
                                 keys `transformer.*` go to transformer_<algorithm>/ (trainer/algorithms/base.py)
    aux.safetensors              auxiliary modules, never inside transformer/: `repa_projector.*` (REPA, training
                                 only), `sprint_fusion.*` (SPRINT: part of the model at inference too), and the
                                 algorithms' other state as `<algorithm>.<key>`, e.g. the EMA of the auxiliary
                                 modules as `ema.sprint_fusion.*` (only when a run has any of them)
    optimizer.safetensors        each optimizer's state tensors under its own prefix:
                                 {adamw|muon}.state.{param index}.{exp_avg|exp_avg_sq|step|momentum_buffer}
    optimizer.json               {adamw|muon: param groups and non-tensor state}
    rng-rank{R}.safetensors      torch CPU RNG, the objective's generator, CUDA RNG (uint8 state tensors)
    state.json                   step, optimizer hyper-parameters, config hash, counters
    loader-rank{R}.json          the loader's exact position after the last batch trained on: a few integers per
                                 source (open shards, offsets, shuffle block), draw counters, counts (see trainer.data)
    checksums.json               {"sha256": {relative path: hex digest}} of every other file, written last
A checkpoint is written under a temporary name and renamed when complete; `latest()` only sees complete ones.
`problem(path)` says what is damaged in one (a file that differs from its checksum, is missing, or does not
parse); `verify(path)` raises it as DamagedCheckpoint, a one-line error every CLI prints.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from contract.errors import PrxError
from trainer.model import INFERENCE_AUX

CKPT_RE = re.compile(r"step-(\d{8})")
CHECKSUMS = "checksums.json"


class DamagedCheckpoint(PrxError):
    """A checkpoint file that differs from its checksum, is missing or does not parse; the message names it."""


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


# ------------------------------------------------------------------------------------------- integrity
def _files(path: str) -> list[str]:
    """Every file in checkpoint folder `path`, relative, sorted, checksums.json left out."""
    out = []
    for root, _, names in os.walk(path):
        out += [os.path.relpath(os.path.join(root, n), path) for n in names]
    return sorted(f for f in out if f != CHECKSUMS)


def sha256_file(file: str, flush: bool = False) -> str:
    """The file's sha256 (hex), read in 16 MiB blocks; `flush`: fsync it too."""
    h = hashlib.sha256()
    with open(file, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
        if flush:
            os.fsync(fh.fileno())
    return h.hexdigest()


def write_checksums(path: str) -> None:
    """checksums.json: size and sha256 of every file in `path`, each file flushed to disk first (so a crash cannot
    leave a published checkpoint cut short); written last, under a temporary name renamed into place."""
    files = _files(path)
    doc = {"sha256": {f: sha256_file(os.path.join(path, f), flush=True) for f in files},
           "bytes": {f: os.path.getsize(os.path.join(path, f)) for f in files}}
    tmp = os.path.join(path, f".{CHECKSUMS}.tmp")
    with open(tmp, "w") as fh:
        json.dump(doc, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(path, CHECKSUMS))


def has_checksums(path: str) -> bool:
    return os.path.exists(os.path.join(path, CHECKSUMS))


def _read_json(file: str) -> Any:
    try:
        with open(file) as fh:
            return json.load(fh)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise DamagedCheckpoint(f"{file} does not parse as JSON ({exc})") from None


def _read_tensors(file: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except SafetensorError as exc:
        raise DamagedCheckpoint(f"{file} does not parse as safetensors ({exc})") from None


def _selected(rel: str, only: tuple[str, ...]) -> bool:
    return not only or any(rel == o or rel.startswith(o + "/") for o in only)


def _checksum_problem(path: str, only: tuple[str, ...]) -> str | None:
    """The first file that differs from checksums.json (missing, other size, other sha256), or None."""
    if why := _parse_problem(path, CHECKSUMS):
        return why
    doc = _read_json(os.path.join(path, CHECKSUMS))
    sums, sizes = (doc.get("sha256"), doc.get("bytes")) if isinstance(doc, dict) else (None, None)
    if not (isinstance(sums, dict) and isinstance(sizes, dict)):
        return f"{CHECKSUMS} has no sha256 and bytes tables"
    for rel in sorted(r for r in sums if _selected(r, only)):
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            return f"{rel} is missing"
        if os.path.getsize(file) != sizes.get(rel):
            return f"{rel} is {os.path.getsize(file)} bytes, {CHECKSUMS} records {sizes.get(rel)}"
        try:
            if sha256_file(file) != sums[rel]:
                return f"{rel} checksum mismatch"
        except OSError as exc:  # a bad disk sector (EIO), a permission
            return f"{rel} cannot be read ({exc.strerror})"
    return None


def _parse_problem(path: str, rel: str) -> str | None:
    """Why file `rel` of checkpoint `path` does not parse (JSON; safetensors header and length), or None."""
    file = os.path.join(path, rel)
    try:
        if rel.endswith(".json"):
            with open(file) as fh:
                doc = json.load(fh)
            if rel == "state.json" and not (isinstance(doc, dict) and isinstance(doc.get("step"), int)):
                return "state.json has no integer step"
        elif rel.endswith(".safetensors"):
            with safe_open(file, "pt"):
                pass
    except (ValueError, SafetensorError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return f"{rel} does not parse ({exc})"
    except OSError as exc:
        return f"{rel} cannot be read ({exc.strerror})"
    return None


def _required(path: str) -> list[str]:
    """The files --resume reads (every rank's RNG and loader state)."""
    state = os.path.join(path, "state.json")
    world = _read_json(state).get("world_size", 1) if os.path.isfile(state) else 0
    ranks = [f"{kind}-rank{r}.{ext}" for r in range(world if isinstance(world, int) else 1) for kind, ext in
             (("rng", "safetensors"), ("loader", "json"))]
    return ["state.json", "optimizer.json", "optimizer.safetensors", "transformer/config.json", *ranks]


def problem(path: str, only: tuple[str, ...] = ()) -> str | None:
    """What is damaged in checkpoint `path` ("FILE why", the first found), or None when it is intact: files
    checksums.json records must match it (a checkpoint without one is checked by parsing alone), every file must
    parse, and all the files --resume reads must be there. `only`: just these files or folders."""
    if has_checksums(path) and (why := _checksum_problem(path, only)):
        return why
    for rel in (f for f in _files(path) if _selected(f, only)):
        if why := _parse_problem(path, rel):
            return why
    if not only:
        missing = [rel for rel in _required(path) if not os.path.isfile(os.path.join(path, rel))]
        if missing:
            return f"{missing[0]} is missing"
    return None


def verify(path: str, only: tuple[str, ...] = ()) -> None:
    """Raise DamagedCheckpoint naming the damaged file of checkpoint `path` (see `problem`)."""
    why = problem(path, only)
    if why:
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: {why}; use another checkpoint of the run")


def set_aside(path: str) -> str:
    """Rename damaged checkpoint `path` to damaged-step-N (-2, -3, ... when taken), out of list_checkpoints' sight;
    returns the new path."""
    root, name = os.path.split(path)
    dest, n = os.path.join(root, f"damaged-{name}"), 1
    while os.path.exists(dest):
        n += 1
        dest = os.path.join(root, f"damaged-{name}-{n}")
    os.replace(path, dest)
    return dest


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


def aux_tensors(denoiser) -> dict[str, torch.Tensor]:
    """The auxiliary modules' state, `{module}.{name}`."""
    return {k: v.detach().cpu().contiguous() for k, v in denoiser.aux.state_dict().items()} if denoiser else {}


def load_aux(path: str, denoiser, tensors: dict[str, torch.Tensor]) -> None:
    """Restore the auxiliary modules from aux.safetensors' `tensors` (the algorithms' state left out); both sides
    must agree."""
    have = {k.split(".", 1)[0] for k in tensors}
    want = set(denoiser.aux.keys()) if denoiser is not None else set()
    if have != want:
        raise ValueError(f"{path} has auxiliary modules {sorted(have) or 'none'}, this run builds {sorted(want) or 'none'}"
                         ": resume with the same --repa-weight / --routing as the run that wrote it")
    if want:
        denoiser.aux.load_state_dict(tensors, strict=True)


WEIGHTS_KEY = "transformer."  # an algorithm's state key naming a transformer weight (-> transformer_<name>/)


def algorithm_files(algorithms) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """The algorithms' checkpoint state (trainer/algorithms/base.py): ({folder: transformer weights},
    {`<name>.<key>`: tensor for aux.safetensors})."""
    folders, aux = {}, {}
    for algo in algorithms:
        state = algo.state_dict()
        weights = {k[len(WEIGHTS_KEY):]: v for k, v in state.items() if k.startswith(WEIGHTS_KEY)}
        if weights:
            folders[f"transformer_{algo.name}"] = weights
        aux.update({f"{algo.name}.{k}": v.detach().cpu().contiguous() for k, v in state.items()
                    if not k.startswith(WEIGHTS_KEY)})
    return folders, aux


def _save_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], folder: str) -> None:
    """`model` with `weights` swapped in, written with its own save_pretrained (then the live weights back)."""
    params = dict(model.named_parameters())
    live = {n: params[n].detach().clone() for n in weights}
    with torch.no_grad():
        try:
            for n, t in weights.items():
                params[n].copy_(t)
            model.save_pretrained(folder, safe_serialization=True)
        finally:
            for n, t in live.items():
                params[n].copy_(t)


def load_algorithm(path: str, algo, aux: dict[str, torch.Tensor]) -> None:
    """Restore one algorithm's state from checkpoint `path` (its `transformer_<name>/` and `<name>.*` in aux)."""
    want = set(algo.state_dict())
    got = {k[len(algo.name) + 1:]: v for k, v in aux.items() if k.startswith(algo.name + ".")}
    folder = f"transformer_{algo.name}"
    if any(k.startswith(WEIGHTS_KEY) for k in want):
        if not os.path.isdir(os.path.join(path, folder)):
            raise ValueError(f"{path} has no {folder}/: it was written without {algo.name}; resume with the same "
                             "options as the run that wrote it")
        got.update({WEIGHTS_KEY + k: v for k, v in read_weights(path, folder).items() if WEIGHTS_KEY + k in want})
    if set(got) != want:
        raise ValueError(f"{path} holds {algo.name} state {sorted(got)[:3]}, this run keeps {sorted(want)[:3]}: "
                         "resume with the same options as the run that wrote it")
    algo.load_state_dict(got)


def write_main(tmp: str, model: torch.nn.Module, optimizer, state: dict[str, Any], denoiser=None,
               algorithms=()) -> None:
    """Rank 0's part: weights (raw, the algorithms' transformer_<name>/, auxiliary modules and the algorithms'
    other state), optimizer, state.json (written last)."""
    os.makedirs(tmp, exist_ok=True)
    model.save_pretrained(os.path.join(tmp, "transformer"), safe_serialization=True)
    folders, algo_aux = algorithm_files(algorithms)
    for folder, weights in folders.items():
        _save_weights(model, weights, os.path.join(tmp, folder))
    aux = {**aux_tensors(denoiser), **algo_aux}
    if aux:
        modules = ",".join(denoiser.aux.keys()) if denoiser is not None else ""
        save_file(aux, os.path.join(tmp, "aux.safetensors"), metadata={"modules": modules})
    tensors, meta = optimizer_tensors(optimizer)
    save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
    with open(os.path.join(tmp, "optimizer.json"), "w") as fh:
        json.dump(meta, fh)
    with open(os.path.join(tmp, "state.json"), "w") as fh:
        json.dump(state, fh, indent=2)


def publish(run_dir: str, step: int, keep: int = 0) -> str:
    """Write checksums.json into the finished temporary folder, rename it into place, then drop old checkpoints
    beyond `keep` (after the rename is on disk)."""
    final = ckpt_dir(run_dir, step)
    write_checksums(tmp_dir(run_dir, step))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp_dir(run_dir, step), final)
    _fsync_dir(os.path.dirname(final))
    if keep > 0:
        for _, path in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_weights(path: str, sub: str = "transformer") -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's transformer/ (or transformer_ema/) folder (safetensors only)."""
    folder = os.path.join(path, sub)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) if os.path.isdir(folder) else []
    if not files:
        raise FileNotFoundError(f"{folder}: no .safetensors weights")
    sd = {}
    for f in files:
        sd.update(_read_tensors(os.path.join(folder, f)))
    return sd


def load_weights(model: torch.nn.Module, path: str, sub: str = "transformer") -> None:
    """Weights from a checkpoint's transformer/ (or transformer_ema/) folder into `model`."""
    folder = os.path.join(path, sub)
    sd = read_weights(path, sub)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def load(path: str, rank: int, model: torch.nn.Module, optimizer, generator: torch.Generator, denoiser=None,
         algorithms=()) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore model (+ auxiliary modules, the algorithms' state), optimizer and RNG in place; returns
    (state.json, this rank's loader state)."""
    state = _read_json(os.path.join(path, "state.json"))
    load_weights(model, path)
    file = os.path.join(path, "aux.safetensors")
    aux = _read_tensors(file) if os.path.exists(file) else {}
    owned = tuple(f"{a.name}." for a in algorithms)
    load_aux(path, denoiser, {k: v for k, v in aux.items() if not k.startswith(owned)})
    for algo in algorithms:
        load_algorithm(path, algo, aux)
    meta = _read_json(os.path.join(path, "optimizer.json"))
    load_optimizer(optimizer, _read_tensors(os.path.join(path, "optimizer.safetensors")), meta)
    rng_path = os.path.join(path, f"rng-rank{rank}.safetensors")
    if not os.path.exists(rng_path):
        raise FileNotFoundError(f"{path} has no state for rank {rank}: resume with the same number of processes "
                                f"({state.get('world_size')})")
    restore_rng(_read_tensors(rng_path), generator)
    return state, _read_json(os.path.join(path, f"loader-rank{rank}.json"))


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
    why = problem(ckpt, only=(sub, "aux.safetensors", "state.json"))
    if why:
        raise DamagedCheckpoint(f"--init-from {init_from}: checkpoint {ckpt} is damaged: {why}; pass an intact "
                                "checkpoint folder (RUN/checkpoints/step-N) of the parent")
    parent_cfg = _read_json(os.path.join(ckpt, sub, "config.json"))
    mine = dict(denoiser.transformer.config)
    diff = sorted(k for k in mine if not k.startswith("_") and k in parent_cfg and parent_cfg[k] != mine[k])
    if diff:
        raise ValueError(f"--init-from {init_from}: another architecture ({', '.join(f'{k} {parent_cfg[k]} vs {mine[k]}' for k in diff)}); "
                         "use the parent's --model, or train from scratch")
    data_file = os.path.join(run_dir, "data.json")
    if not os.path.exists(data_file):
        raise FileNotFoundError(f"--init-from {init_from}: {data_file} is missing, so the parent's encoders are unknown")
    parent_data = _read_json(data_file)
    for label, key, now in (("VAE", "vae", vae), ("text encoder", "text_encoder", text_encoder)):
        if not _same_encoder(parent_data.get(key) or {}, now or {}):
            raise ValueError(f"--init-from {init_from}: the parent was trained on shards from another {label} "
                             f"({(parent_data.get(key) or {}).get('id')} vs {(now or {}).get('id')}): fine-tune on "
                             "shards encoded with the parent's encoders")
    load_weights(denoiser.transformer, ckpt, sub)
    file = os.path.join(ckpt, "aux.safetensors")
    parent_aux = _read_tensors(file) if os.path.exists(file) else {}
    ema = "ema." if weights == "ema" and any(k.startswith("ema.") for k in parent_aux) else ""
    for name, flag in INFERENCE_AUX.items():  # modules that are part of the model (SPRINT fusion, resolution tokens)
        got = {k[len(ema + name) + 1:]: v for k, v in parent_aux.items() if k.startswith(f"{ema}{name}.")}
        if got and name not in denoiser.aux:
            raise ValueError(f"--init-from {init_from}: the parent was trained with {flag}, whose {name} is part of "
                             f"the model; fine-tune it with {flag} too")
        if got:
            denoiser.aux[name].load_state_dict({**denoiser.aux[name].state_dict(), **got})
    step = _read_json(os.path.join(ckpt, "state.json")).get("step")
    return {"init_from": os.path.abspath(ckpt), "run": os.path.abspath(run_dir), "step": step, "weights": weights}
