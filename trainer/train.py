"""The training loop: one process or `torchrun` DDP; stdout + TensorBoard logging; exact resume.

`run(cfg)` returns a summary with the loss of every step (tests compare runs step for step).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any, Callable

import torch

from contract.config import ConfigError, config_hash, content_fields, save_yaml
from contract.lock import LockHeld, exclusive
from trainer import ablations, checkpoint, metrics
from trainer.batches import LoaderFeed, LoaderSettings, RankAgreement, StepStats, device_inputs
from trainer.config import TrainConfig, absolute_paths, load_mixture, refuse_unsafe, unsafe_changes
from trainer.data import DataSpec, open_sources, pad_embedding
from trainer.model import build_model, check_weights_dtype, count_parameters, train_flops_per_sample
from trainer.objective import ObjectiveConfig, caption_dropout, draw_noise, losses as step_losses, per_sample_loss
from trainer.optim import build_optimizer, clip_grad, lr_at, set_lr

log = logging.getLogger("prx.train")


# ------------------------------------------------------------------------------------------- setup
def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def pick_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda but no CUDA device is visible")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _barrier(world: int):
    if world > 1:
        torch.distributed.barrier()


def _resolve_run_dir(cfg: TrainConfig) -> str:
    if cfg.resume:
        if not os.path.isdir(cfg.resume):
            raise FileNotFoundError(f"--resume {cfg.resume}: no such run folder")
        if cfg.out and os.path.abspath(cfg.out) != os.path.abspath(cfg.resume):
            raise ValueError(f"--out {cfg.out}: a resumed run continues in its own folder {cfg.resume}; drop --out")
        return cfg.resume
    if not cfg.out:
        raise ValueError("--out RUN_DIR is required (or --resume RUN_DIR)")
    if checkpoint.list_checkpoints(cfg.out):
        raise FileExistsError(f"{cfg.out} already holds checkpoints: pass --resume {cfg.out} to continue it, "
                              "or choose another --out")
    return cfg.out


@contextmanager
def _run_lock(run_dir: str, rank: int, world: int):
    """Rank 0 holds RUN's lock (contract.lock) for the whole run; when another process holds it, every rank stops
    with the holder's name."""
    with ExitStack() as stack:
        held = None
        if rank == 0:
            try:
                stack.enter_context(exclusive(run_dir, f"prx-train on {run_dir}"))
            except LockHeld as exc:
                held = str(exc)
        held = _from_rank0(world, held)
        if held:
            raise _agreed(LockHeld(held), world)
        yield


def _resume_point(cfg: TrainConfig, rank: int, world: int) -> str | None:
    """--resume RUN: its newest intact checkpoint, refused unless the run can continue from it with these flags.
    Rank 0 checks the checkpoints (checkpoint.problem), says which it skipped and why, and sets them aside."""
    if not cfg.resume:
        return None
    picked = _pick_intact(cfg.resume) if rank == 0 else None
    path, damaged = _from_rank0(world, picked)
    if path is None and not damaged:
        raise FileNotFoundError(f"--resume {cfg.resume}: no complete checkpoint in {cfg.resume}/checkpoints")
    if path is None:
        found = "; ".join(f"{os.path.basename(p)}: {why}" for p, why in damaged)
        raise _agreed(checkpoint.DamagedCheckpoint(
            f"--resume {cfg.resume}: no intact checkpoint ({found}); restore one from a copy, or start a new run "
            "with --out"), world)
    if rank == 0:
        for p, why in damaged:
            print(f"prx-train: skipped checkpoint {p}: {why} (moved to {checkpoint.set_aside(p)})", file=sys.stderr)
        if not checkpoint.has_checksums(path):
            print(f"prx-train: note: {path} has no {checkpoint.CHECKSUMS} (written before checkpoints carried "
                  "checksums): its files parse, a changed byte inside them would go unnoticed", file=sys.stderr)
    try:
        _check_resume(cfg, path, world)
    except (ConfigError, ValueError) as exc:
        raise _agreed(exc, world)
    return path


def _pick_intact(run_dir: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(the newest intact checkpoint or None, [(newer damaged checkpoint, what is damaged)])."""
    damaged = []
    for _, path in reversed(checkpoint.list_checkpoints(run_dir)):
        why = checkpoint.problem(path)
        if why is None:
            return path, damaged
        damaged.append((path, why))
    return None, damaged


def _check_resume(cfg: TrainConfig, path: str, world: int) -> None:
    """The run can continue from checkpoint `path` with these flags: same processes, only safe flags changed,
    --steps beyond the checkpoint's step."""
    ablations.check_resume(cfg, path)
    with open(os.path.join(path, "state.json")) as fh:
        state = json.load(fh)
    if state.get("world_size", 1) != world:
        raise ValueError(f"{path} was written by {state.get('world_size')} processes; resume with as many")
    now = json.loads(json.dumps(content_fields(cfg), default=str))
    refuse_unsafe(unsafe_changes(state.get("config", {}), now), state.get("config", {}), now, cfg.resume)
    if cfg.steps <= state["step"]:
        raise ValueError(f"--resume {cfg.resume}: the run is already at step {state['step']} ({path}); --steps "
                         f"{cfg.steps} must be larger to train further (prx-train --resume {cfg.resume} --steps N)")


def _from_rank0(world: int, value):
    """Rank 0's `value` on every rank."""
    if world == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _agreed(exc: Exception, world: int) -> Exception:
    exc.agreed = world > 1  # every rank raises it: the CLI lets every rank print before any exits
    return exc


def loader_settings(cfg: TrainConfig, rank: int, batch_size: int | None = None, seed: int | None = None):
    return LoaderSettings.of(cfg, rank=rank, batch_size=batch_size or cfg.batch_size,
                             seed=cfg.seed if seed is None else seed)


def make_eval_batch(spec: DataSpec, cfg: TrainConfig, oc: ObjectiveConfig):
    """A fixed evaluation batch: its own loader seed, fixed noise and timesteps, no caption dropout."""
    batch = loader_settings(cfg, 0, cfg.eval_batch_size, cfg.seed + 1_000_003).loader(spec).next_batch()
    g = torch.Generator().manual_seed(cfg.seed + 7)
    eps, t = draw_noise(batch.x0.shape, oc, g)
    return batch, eps, t


@torch.no_grad()
def eval_loss(model, batch, eps, t, oc: ObjectiveConfig, device, amp) -> float:
    was = model.training
    model.eval()
    emb, mask = batch.padded(device)
    loss = per_sample_loss(model, batch.x0.to(device), eps.to(device), t.to(device), emb, mask, oc, amp).mean()
    model.train(was)
    return float(loss)


# ------------------------------------------------------------------------------------------- run
def run(cfg: TrainConfig, on_step: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Train; returns {"losses": [...], "eval": [(step, loss)], "counts": {...}, "run_dir": ...}.
    `on_step(step, values)` gets the step's loss and grad norm as device tensors (float() them to read)."""
    rank, world, local_rank = dist_env()
    device = pick_device(cfg, local_rank)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    cfg = absolute_paths(cfg)
    run_dir = _resolve_run_dir(cfg)
    mixture = load_mixture(cfg)
    spec = open_sources(mixture, cfg.vae, cfg.text_encoder, rank, world,  # refuse bad data before writing anything
                        with_repa=cfg.repa_weight > 0)
    with _run_lock(run_dir, rank, world):
        resume_from = _resume_point(cfg, rank, world)  # refuses before anything is written
        return _train(cfg, on_step, spec, device, run_dir, resume_from)


def _train(cfg: TrainConfig, on_step, spec: DataSpec, device: torch.device, run_dir: str,
           resume_from: str | None) -> dict[str, Any]:
    rank, world, local_rank = dist_env()
    os.makedirs(run_dir, exist_ok=True)
    _setup_logging(run_dir, rank)
    oc = ObjectiveConfig.from_train_config(cfg)
    amp = autocast_dtype(cfg, device)

    model = build_model(cfg.model, spec.latent_channels, spec.text_dim, seed=cfg.seed)
    if cfg.weights_dtype == "bf16":
        model = model.to(torch.bfloat16)
    check_weights_dtype(model, cfg.weights_dtype)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.to(device).train()
    # PRX ablations: checks before step 1, auxiliary modules (REPA projector, SPRINT fusion), fine-tune start, EMA
    abl = ablations.build(cfg, model, spec, device, log)
    optimizer = build_optimizer(abl.denoiser, cfg)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)

    chash = config_hash(cfg, {"sources": [(s.name, s.folder, s.weight) for s in spec.sources],
                              "world_size": world})
    start, loader_state = 0, None
    if resume_from:
        state, loader_state = checkpoint.load(resume_from, rank, model, optimizer, generator, abl.denoiser, abl.ema)
        start = int(state["step"])
        if rank == 0:
            log.info("resumed from %s at step %d", resume_from, start)
    ablations.start(abl, cfg, start)
    if rank == 0:
        _write_run_records(run_dir, cfg, spec, world, chash, abl.parent)

    train_model = abl.denoiser
    if cfg.compile:
        train_model = torch.compile(model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(train_model, device_ids=[local_rank] if device.type == "cuda" else None,
                                              find_unused_parameters=bool(abl.repa_on and cfg.repa_until_step))

    empty_emb, empty_mask, _ = pad_embedding(spec.empty_prompt, cfg.text_max_length)
    empty_emb, empty_mask = empty_emb.to(device), empty_mask.to(device)
    peak = metrics.device_peak_flops(device, cfg.peak_tflops)
    # the meter sees every rank's FLOPs (flops * world below), so MFU divides by every rank's peak
    meter = metrics.Meter(cfg.rate_window, peak * world if peak else None)
    mcfg = dict(model.config)
    tb = _tensorboard(run_dir) if (cfg.tensorboard and rank == 0) else None
    eval_set = make_eval_batch(spec, cfg, oc) if cfg.eval_every > 0 else None
    if rank == 0:
        log.info("model %s: %.1fM parameters, device %s, autocast %s, peak %s, world %d, batch %d x accum %d, "
                 "loader workers %d", cfg.model, count_parameters(model) / 1e6, device, amp, "n/a" if peak is None
                 else f"{peak / 1e12:.0f} TFLOP/s", world, cfg.batch_size, cfg.grad_accum, cfg.loader_workers)

    feed = LoaderFeed(spec, loader_settings(cfg, rank), loader_state, workers=cfg.loader_workers,
                      prefetch=cfg.prefetch, pin_memory=device.type == "cuda")
    agree = RankAgreement(rank, world)
    stats = StepStats(device)
    losses: list[float] = []
    evals: list[tuple[int, float]] = []
    evals_ema: list[tuple[int, float]] = []
    if eval_set is not None and start == 0:
        evals.append((0, eval_loss(abl.denoiser, *eval_set, oc, device, amp)))
    extras: dict[str, torch.Tensor] = {}  # ablation logs (flow/REPA loss, REPA cosine), summed until logged
    step, drained = start, start
    meter.restart_clock()
    try:
        for step in range(start, cfg.steps):
            lr = lr_at(step, cfg.lr, cfg.warmup_steps)
            set_lr(optimizer, lr)
            n_samples, flops = 0, 0.0
            for micro in range(cfg.grad_accum):
                batch = agree.fetch(feed.next)
                eps, t = draw_noise(batch.x0.shape, oc, generator)
                x0, emb, mask = device_inputs(batch, device, empty_emb, empty_mask, oc.caption_dropout, generator)
                sync = world == 1 or micro == cfg.grad_accum - 1
                ctx = nullcontext() if sync else train_model.no_sync()
                repa_in = batch.repa.to(device, non_blocking=True) if abl.repa_on else None
                with ctx:
                    out = step_losses(train_model, x0, eps.to(device, non_blocking=True), t.to(device), emb, mask,
                                      oc, amp, repa_features=repa_in,
                                      route_seed=ablations.route_seed(cfg, step, rank, micro))
                    per = out.flow
                    loss, parts = ablations.total_loss(abl, cfg, out)
                    (loss / cfg.grad_accum).backward()
                for k, v in parts.items():
                    extras[k] = extras.get(k, 0.0) + v / cfg.grad_accum
                stats.add_micro(per, t, cfg.grad_accum, loss)
                n_samples += len(batch)
                h, w = batch.x0.shape[-2:]
                flops += len(batch) * train_flops_per_sample(
                    mcfg, h, w, cfg.text_max_length, ablations.flops_route(cfg, batch.x0.shape, mcfg["patch_size"]),
                    fusion=cfg.routing == "sprint")
            grad_norm = clip_grad(abl.denoiser, cfg.grad_clip, as_tensor=True)  # aux modules (REPA, SPRINT) included
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_loss = stats.end_step(grad_norm)
            done = step + 1
            ablations.after_step(abl, cfg, done, n_samples * world, cfg.grad_accum, log if rank == 0 else None)
            meter.tick(cfg.grad_accum, n_samples * world, flops * world)
            if eval_set is not None and done % cfg.eval_every == 0:
                evals.append((done, eval_loss(abl.denoiser, *eval_set, oc, device, amp)))
                if abl.ema is not None:
                    with abl.ema.applied(abl.denoiser):
                        evals_ema.append((done, eval_loss(abl.denoiser, *eval_set, oc, device, amp)))
            log_now = done % cfg.log_every == 0 or done == cfg.steps
            if log_now or done % cfg.checkpoint_every == 0:
                # the only host sync of the step: values since the last one (raises on a non-finite loss)
                new, bins, norm = stats.drain(drained)
                losses.extend(new)
                meter.record(new, bins, norm)
                drained = done
            if rank == 0 and log_now:
                values = meter.summary(lr)
                counts = feed.state()["counts"]
                values.update(ablations.log_values(cfg, extras, batch.x0.shape, mcfg["patch_size"]))
                log.info(metrics.format_line(done, cfg.steps, values, _count_summary(counts))
                         + ablations.log_suffix(values))
                if evals and evals[-1][0] == done:
                    log.info("step %d eval/loss=%.4f (fixed batch)", done, evals[-1][1])
                if evals_ema and evals_ema[-1][0] == done:
                    log.info("step %d eval/loss_ema=%.4f (fixed batch, EMA weights)", done, evals_ema[-1][1])
                if tb is not None:
                    _tb_write(tb, done, values, counts, evals)
                    if evals_ema and evals_ema[-1][0] == done:
                        tb.add_scalar("eval/loss_ema", evals_ema[-1][1], done)
            if log_now:
                meter.reset()
                extras = {}
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                _save(run_dir, done, rank, world, model, optimizer, generator, feed, cfg, chash, abl)

            # --- evaluation during training (trainer.evaluate: on the checkpoint just saved, EMA when present)
            if cfg.metrics_every and done % cfg.metrics_every == 0 and rank == 0:
                from trainer.evaluate import during_training

                log.info("step %d metrics: %s", done, during_training(run_dir, done, cfg.metrics_real, cfg.metrics_n, tb))
            if on_step is not None:
                on_step(done, {"loss": step_loss, "grad_norm": stats.grad_norm, "lr": lr})
    finally:
        feed.close()
        if tb is not None:
            tb.close()
    counts = feed.state()["counts"]
    if rank == 0:
        with open(os.path.join(run_dir, f"counts-rank{rank}.json"), "w") as fh:
            json.dump(counts, fh, indent=2)
        log.info("done: %d steps; realised counts %s", cfg.steps, json.dumps(counts))
        ablations.write_summary(abl, run_dir, device, {"steps": cfg.steps, "start_step": start,
                                                       "final_loss": losses[-1] if losses else None})
    return {"losses": losses, "eval": evals, "eval_ema": evals_ema, "counts": counts, "run_dir": run_dir,
            "start_step": start, "model": model, "denoiser": abl.denoiser, "ema": abl.ema}


def _write_run_records(run_dir: str, cfg: TrainConfig, spec: DataSpec, world: int, chash: str,
                       parent: dict | None = None) -> None:
    """RUN/config.yaml (fully resolved: what `--resume RUN` continues, usable as --config too) and
    RUN/data.json (sources, the name `prx-data audit` gives each, shards per rank, encoders)."""
    save_yaml(dataclasses.replace(cfg, config=None, base=None, resume=None, out=run_dir),
              os.path.join(run_dir, "config.yaml"))
    uneven = [s for s in spec.sources if len(s.shards) % world]
    for s in uneven:
        log.info("source %s: %d shards over %d processes: each rank reads %d or %d per epoch; the assignment "
                 "rotates every epoch, so every shard is read equally often over epochs", s.name, len(s.shards),
                 world, len(s.shards) // world + 1, len(s.shards) // world)
    with open(os.path.join(run_dir, "data.json"), "w") as fh:
        json.dump({"sources": [{"name": s.name, "audit_source": s.audit_source, "folder": s.folder,
                                "weight": s.weight, "shards": len(s.shards),
                                "shards_per_rank": [len(range(r, len(s.shards), world)) for r in range(world)]}
                               for s in spec.sources],
                   "captions": spec.captions, "vae": spec.vae, "text_encoder": spec.text_encoder,
                   "open_shards": cfg.open_shards, "shuffle_buffer": cfg.shuffle_buffer,
                   "config_hash": chash, "parent": parent}, fh, indent=2, default=str)


def _count_summary(counts: dict) -> dict[str, str]:
    out = {}
    for kind in ("source", "variant"):
        total = sum(counts[kind].values()) or 1
        out[kind] = ",".join(f"{k}:{v / total:.2f}" for k, v in counts[kind].items())
    return out


def _save(run_dir, step, rank, world, model, optimizer, generator, feed, cfg, chash, abl=None):
    tmp = checkpoint.tmp_dir(run_dir, step)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # what a killed save left there
        os.makedirs(tmp, exist_ok=True)
    _barrier(world)
    checkpoint.write_rank_files(tmp, rank, generator, feed.state())
    _barrier(world)
    if rank == 0:
        checkpoint.write_main(tmp, model, optimizer, {"step": step, "world_size": world, "config_hash": chash,
                                                      "config": json.loads(json.dumps(content_fields(cfg), default=str)),
                                                      "time": time.time()},
                              abl.denoiser if abl else None, abl.ema if abl else None)
        path = checkpoint.publish(run_dir, step, cfg.keep_checkpoints)
        log.info("saved %s", path)
    _barrier(world)


def _tensorboard(run_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # pragma: no cover - tensorboard is a dependency
        log.warning("tensorboard is not installed: logging to stdout only")
        return None
    return SummaryWriter(os.path.join(run_dir, "tb"))


def _tb_write(tb, step: int, values: dict, counts: dict, evals: list):
    for k, v in values.items():
        if v is not None:
            tb.add_scalar(f"train/{k}", v, step)
    for kind in ("source", "variant"):
        total = sum(counts[kind].values()) or 1
        for name, n in counts[kind].items():
            tb.add_scalar(f"data/{kind}/{name}", n / total, step)
    if evals and evals[-1][0] == step:
        tb.add_scalar("eval/loss", evals[-1][1], step)


def _setup_logging(run_dir: str, rank: int):
    if rank != 0:
        log.setLevel(logging.WARNING)
        return
    log.setLevel(logging.INFO)
    if not any(getattr(h, "_prx", False) for h in log.handlers):
        fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
        out = logging.StreamHandler(sys.stdout)
        out.setFormatter(fmt)
        out._prx = True  # type: ignore[attr-defined]
        log.addHandler(out)
    for h in list(log.handlers):
        if getattr(h, "_prx_file", False):
            log.removeHandler(h)
            h.close()
    fh = logging.FileHandler(os.path.join(run_dir, "train.log"))
    fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    fh._prx_file = True  # type: ignore[attr-defined]
    log.addHandler(fh)
    log.propagate = False
