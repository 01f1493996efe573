"""The PRX ablations wired into a run: checks before step 1, the denoiser with its auxiliary modules, the
per-step hooks (EMA update, REPA burn-in), the fine-tune start and RUN/summary.json.

train.py calls: `build` (after the model), `check_resume` (after loading a checkpoint), `route_seed`,
`total_loss` (per micro-batch), `after_step` (after each optimizer step), `write_summary` (at the end).
Each technique lives in its own module: optim.py (Muon), repa.py, routing.py (TREAD/SPRINT), ema.py.
"""
from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from contract.errors import PrxError
from contract.shards import Problem, read_shard
from contract import encoded
from trainer import checkpoint, repa, routing
from trainer.ema import EMA
from trainer.model import Denoiser

CAPTION_PROBE = 64  # samples of a source's first shard looked at for the asked caption variants


@dataclass
class Ablations:
    denoiser: Denoiser
    ema: EMA | None = None
    parent: dict[str, Any] | None = None      # the fine-tune parent (init_from), recorded in data.json
    repa_on: bool = False
    clock: dict[str, float] = field(default_factory=lambda: {"t0": 0.0, "samples": 0, "batches": 0, "steps": 0})


def build(cfg, model, spec, device: torch.device, log=None) -> Ablations:
    """Refuse bad ablation input (before step 1), build the denoiser + auxiliary modules, load a fine-tune
    parent, start the EMA."""
    depth = len(model.blocks)
    routing.check_blocks(cfg.routing, cfg.route_start, cfg.route_end, depth)
    check_captions(spec)
    repa_on = cfg.repa_weight > 0
    repa_dim = None
    if repa_on:
        repa.check_block(cfg.repa_block, depth)
        repa_dim = repa.check_sources([s.info for s in spec.sources], (spec.vae or {}).get("downsample"),
                                      model.config.patch_size)
    den = Denoiser(model, cfg.routing, cfg.route_start, cfg.route_end, cfg.route_ratio or 0.0,
                   cfg.repa_block if repa_on else None, repa_dim, seed=cfg.seed)
    den.aux.to(device=device, dtype=next(model.parameters()).dtype)
    parent = None
    if cfg.init_from and not cfg.resume:
        parent = checkpoint.load_parent(cfg.init_from, cfg.init_weights, den, spec.vae, spec.text_encoder)
        if log is not None:
            log.info("fine-tune start from %s (step %s, %s weights)", parent["init_from"], parent["step"],
                     parent["weights"])
    ema = EMA(den, cfg.ema_decay, cfg.ema_every, skip=("aux.repa_projector",)) if cfg.ema_decay > 0 else None
    return Ablations(den, ema, parent, repa_on)


def check_captions(spec) -> None:
    """Every source has the asked caption variants (PRX's baseline: long only), judged from the first samples
    of its first shard: a source never recaptioned stops here, not after thousands of skipped draws."""
    wanted = {v for v, w in spec.captions.items() if w > 0}
    for src in spec.sources:
        found, probed = _probe(src.shards[0], wanted)
        if probed and not found:
            raise PrxError(
                f"source {src.name!r} ({src.folder}) has no {'/'.join(sorted(wanted))} caption embeddings (none in "
                f"the first {probed} samples of {os.path.basename(src.shards[0])}); PRX's baseline trains on long "
                "recaptions: run `prx-data recaption` on its input and re-encode it, or choose the variants it has "
                "with --caption (e.g. --caption original=1)")


def _probe(shard: str, wanted: set[str]) -> tuple[bool, int]:
    """(a sample with one of `wanted` was seen, samples looked at) over the first CAPTION_PROBE samples."""
    probed = 0
    for item in read_shard(shard):
        if isinstance(item, Problem):
            continue
        if set(encoded.available_variants(item)) & wanted:
            return True, probed + 1
        probed += 1
        if probed >= CAPTION_PROBE:
            break
    return False, probed


def check_resume(cfg, path: str) -> None:
    """--resume continues a run exactly; --init-from starts a new one. Both only for a run started that way
    (checked before anything is loaded from checkpoint `path`)."""
    with open(os.path.join(path, "state.json")) as fh:
        state = json.load(fh)
    if cfg.init_from and (state.get("config") or {}).get("init_from") != cfg.init_from:
        raise ValueError(f"--resume continues {cfg.resume} exactly, --init-from {cfg.init_from} starts a new run "
                         "from a parent's weights: pass one of them, not both")


def start(abl: Ablations, cfg, step: int) -> None:
    """State at the first step of this process (a resume past the REPA burn-in has no REPA)."""
    if abl.repa_on and cfg.repa_until_step and step >= cfg.repa_until_step:
        abl.denoiser.stop_repa()
        abl.repa_on = False


def route_seed(cfg, step: int, rank: int, micro: int) -> int | None:
    from trainer.data import seed_for

    return seed_for(cfg.seed, "route", step, rank, micro) if cfg.routing != "none" else None


def total_loss(abl: Ablations, cfg, losses) -> tuple[torch.Tensor, dict[str, float]]:
    """Flow loss (+ REPA loss while REPA is on) and the values to log."""
    flow = losses.flow.mean()
    logs = {"steps": 1.0, "flow_loss": flow.detach()}
    if losses.repa_cos is None:
        return flow, logs
    r = repa.repa_loss(losses.repa_cos, cfg.repa_weight)
    logs.update(repa_loss=r.detach(), repa_cos=losses.repa_cos.detach().mean())
    return flow + r, logs


def log_values(cfg, extras: dict[str, Any], x0_shape, patch: int) -> dict[str, float]:
    """Means since the last log line of what `total_loss` returned (one host sync per log line), and the
    tokens routed past the blocks per sample of the last batch."""
    n = float(extras.get("steps", 0.0)) or 1.0
    out = {k: float(v) / n for k, v in extras.items() if k != "steps"}
    if cfg.routing != "none":
        out["routed_tokens"] = routed_tokens(cfg, x0_shape, patch)
    return out


def log_suffix(values: dict[str, Any]) -> str:
    parts = [f"{k}={values[k]:.4f}" for k in ("flow_loss", "repa_loss", "repa_cos") if values.get(k) is not None]
    if "routed_tokens" in values:
        parts.append(f"routed_tokens={values['routed_tokens']}")
    return (" | " + " ".join(parts)) if parts else ""


def after_step(abl: Ablations, cfg, done: int, samples: int, batches: int, log=None) -> None:
    """After optimizer step `done` (1-based): EMA update, REPA burn-in, throughput clock."""
    if abl.ema is not None:
        abl.ema.maybe_update(abl.denoiser, done)
    if abl.repa_on and cfg.repa_until_step and done >= cfg.repa_until_step:
        abl.denoiser.stop_repa()
        abl.repa_on = False
        if log is not None:
            log.info("step %d: REPA burn-in over (--repa-until-step %d): projector frozen, flow loss only",
                     done, cfg.repa_until_step)
    c = abl.clock
    if c["steps"] == 0 or c["t0"] == 0.0:  # the first step (warm-up, compilation) is not timed
        c.update(t0=time.perf_counter(), steps=1, samples=0, batches=0)
        return
    c["steps"] += 1
    c["samples"] += samples
    c["batches"] += batches
    c["t_end"] = time.perf_counter()  # checkpoints written after this step are not counted


def routed_tokens(cfg, x0_shape, patch: int) -> int:
    n = (x0_shape[-2] // patch) * (x0_shape[-1] // patch)
    return routing.routed_count(n, cfg.route_ratio or 0.0) if cfg.routing != "none" else 0


def flops_route(cfg, x0_shape, patch: int):
    """(start, end, kept tokens) for the FLOPs count, or None."""
    routed = routed_tokens(cfg, x0_shape, patch)
    if not routed:
        return None
    n = (x0_shape[-2] // patch) * (x0_shape[-1] // patch)
    return cfg.route_start, cfg.route_end, n - routed


def write_summary(abl: Ablations, run_dir: str, device: torch.device, extra: dict[str, Any]) -> dict[str, Any]:
    """RUN/summary.json: mean samples/s and batches/s (after the first step), peak memory."""
    c = abl.clock
    secs = c.get("t_end", 0.0) - c["t0"] if c["t0"] else 0.0
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_max_rss_process"
    out = {"samples_per_s": c["samples"] / secs if secs > 0 and c["samples"] else None,
           "batches_per_s": c["batches"] / secs if secs > 0 and c["batches"] else None,
           "timed_steps": max(0, int(c["steps"]) - 1), "peak_memory_bytes": int(peak), "peak_memory_kind": kind,
           **extra}
    with open(os.path.join(run_dir, "summary.json"), "w") as fh:
        json.dump(out, fh, indent=2)
    return out
