"""The training loop: one process or `torchrun` DDP; stdout + TensorBoard logging; exact resume.

`run(cfg)` = `_setup` (model, the training algorithms of trainer/algorithms/ built and started, optimizer,
checkpoint, loader), then per step `_train_step` (minRF's step plus the algorithms' hooks) and `_after_step`
(evaluation, log line, checkpoint), then `_finish` (RUN/summary.json). It returns a summary with the loss of
every step (tests compare runs step for step).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import shutil
import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from contract.config import ConfigError, config_hash, content_fields, save_yaml
from contract.lock import LockHeld, exclusive
from trainer import algorithms, checkpoint, metrics
from trainer.algorithms import Algorithm
from trainer.batches import LoaderFeed, LoaderSettings, RankAgreement, StepStats, device_inputs
from trainer.config import TrainConfig, absolute_paths, load_mixture, refuse_unsafe, unsafe_changes
from trainer.data import DataSpec, check_captions, open_sources, pad_embedding
from trainer.model import (PRESETS, Denoiser, build_model, check_fits, check_preset_for_space, check_weights_dtype,
                           count_parameters, train_flops_per_sample)
from trainer.objective import ObjectiveConfig, autocast_dtype, draw_noise, losses as step_losses, per_sample_loss
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


def _barrier(world: int):
    if world > 1:
        torch.distributed.barrier()


def preflight(cfg: TrainConfig, rank: int = 0, world: int = 1, device: torch.device = torch.device("cpu")):
    """The run's algorithms and its data, checked (encoders, captions, what the algorithms need) before anything
    is written: (algorithms, DataSpec). prx-study calls it for every run before the first one trains."""
    algos = algorithms.active(cfg, rank, device)
    needs = {k: v for a in algos for k, v in a.data_needs().items()}
    spec = open_sources(load_mixture(cfg), cfg.vae, cfg.text_encoder, rank, world, **needs)
    check_captions(spec)
    return algos, spec


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
    """Train; returns {"losses": [...], "eval": [(step, loss)], "eval_<algorithm>": [...], "counts": {...},
    "run_dir": ..., "model", "denoiser", "algorithms": {name: algorithm}, "ema": the EMA or None}.
    `on_step(step, values)` gets the step's loss and grad norm as device tensors (float() them to read)."""
    rank, world, local_rank = dist_env()
    device = pick_device(cfg, local_rank)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    cfg = absolute_paths(cfg)
    run_dir = _resolve_run_dir(cfg)
    algos, spec = preflight(cfg, rank, world, device)
    with _run_lock(run_dir, rank, world):
        resume_from = _resume_point(cfg, rank, world)  # refuses before anything is written
        os.makedirs(run_dir, exist_ok=True)
        _setup_logging(run_dir, rank)
        r = _setup(cfg, spec, device, run_dir, resume_from, algos)
        try:
            for step in range(r.start, cfg.steps):
                _train_step(r, step)
                _after_step(r, step + 1, on_step)
        finally:
            r.feed.close()
            if r.tb is not None:
                r.tb.close()
        return _finish(r)


@dataclass
class Run:
    """Everything one training process holds between steps."""
    cfg: TrainConfig
    spec: DataSpec
    device: torch.device
    run_dir: str
    rank: int
    world: int
    oc: ObjectiveConfig
    amp: torch.dtype | None
    model: torch.nn.Module                  # the PRXTransformer2DModel (transformer/ in checkpoints)
    denoiser: Denoiser                      # the model + the algorithms' auxiliary modules
    train_model: torch.nn.Module            # the denoiser as trained: compiled and/or DDP-wrapped
    algos: list[Algorithm]
    optimizer: Any
    generator: torch.Generator
    feed: LoaderFeed
    chash: str
    start: int
    empty: tuple[torch.Tensor, torch.Tensor]  # the empty prompt (caption dropout), padded, on the device
    meter: metrics.Meter
    tb: Any
    eval_set: tuple | None
    agree: RankAgreement
    stats: StepStats
    logs: "Means" = field(default_factory=lambda: Means())
    clock: "Throughput" = field(default_factory=lambda: Throughput())
    losses: list[float] = field(default_factory=list)
    evals: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # "" = the live weights
    lr: float = 0.0
    step_loss: torch.Tensor | None = None
    drained: int = 0
    samples: int = 0
    flops: float = 0.0


def _setup(cfg: TrainConfig, spec: DataSpec, device: torch.device, run_dir: str, resume_from: str | None,
           algos: list[Algorithm]) -> Run:
    """The model and the algorithms (built, resumed, started), the optimizer, the loader at its position."""
    rank, world, local_rank = dist_env()
    model, den, parent = _build_model(cfg, spec, device, algos)
    optimizer = build_optimizer(den, cfg)  # AdamW, or Muon + AdamW: an optimizer, not an algorithm
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    start, loader_state = 0, None
    if resume_from:
        state, loader_state = checkpoint.load(resume_from, rank, model, optimizer, generator, den, algos)
        start = int(state["step"])
        log.info("resumed from %s at step %d", resume_from, start)
    for a in algos:
        a.start(start)
    chash = config_hash(cfg, {"sources": [(s.name, s.folder, s.weight) for s in spec.sources], "world_size": world})
    if rank == 0:
        _write_run_records(run_dir, cfg, spec, world, chash, parent)
    oc, peak = ObjectiveConfig.from_train_config(cfg), metrics.device_peak_flops(device, cfg.peak_tflops)
    empty_emb, empty_mask, _ = pad_embedding(spec.empty_prompt, cfg.text_max_length)
    r = Run(cfg=cfg, spec=spec, device=device, run_dir=run_dir, rank=rank, world=world, oc=oc,
            amp=autocast_dtype(cfg, device), model=model, denoiser=den, algos=algos, optimizer=optimizer,
            train_model=_wrap(cfg, den, algos, device, local_rank), generator=generator, chash=chash, start=start,
            drained=start, empty=(empty_emb.to(device), empty_mask.to(device)),
            feed=LoaderFeed(spec, loader_settings(cfg, rank), loader_state, workers=cfg.loader_workers,
                            prefetch=cfg.prefetch, pin_memory=device.type == "cuda"),
            agree=RankAgreement(rank, world), stats=StepStats(device),
            eval_set=make_eval_batch(spec, cfg, oc) if cfg.eval_every > 0 else None,
            tb=_tensorboard(run_dir) if (cfg.tensorboard and rank == 0) else None,
            # the meter sees every rank's FLOPs (flops * world), so MFU divides by every rank's peak
            meter=metrics.Meter(cfg.rate_window, peak * world if peak else None))
    log.info("model %s: %.1fM parameters, device %s, autocast %s, peak %s, world %d, batch %d x accum %d, loader "
             "workers %d, algorithms %s", cfg.model, count_parameters(model) / 1e6, device, r.amp,
             "n/a" if peak is None else f"{peak / 1e12:.0f} TFLOP/s", world,
             cfg.batch_size, cfg.grad_accum, cfg.loader_workers, ",".join(a.name for a in algos) or "none")
    if r.eval_set is not None and start == 0:
        _evaluate(r, 0, variants=False)
    r.meter.restart_clock()
    return r


def _check_fits(spec: DataSpec, in_channels: int, patch: int) -> None:
    for src in spec.sources:
        check_fits(in_channels, patch, spec.vae, int(src.info["resolution"]), src.info["buckets"])


def _build_model(cfg: TrainConfig, spec: DataSpec, device: torch.device, algos: list[Algorithm]):
    """(transformer, denoiser with the algorithms' modules, fine-tune parent record or None), on the device."""
    if cfg.model in PRESETS:  # a preset is refused before it is built; a folder's config once loaded
        check_preset_for_space(cfg.model, spec.vae)
        _check_fits(spec, spec.latent_channels, PRESETS[cfg.model]["patch_size"])
    model = build_model(cfg.model, spec.latent_channels, spec.text_dim, seed=cfg.seed)
    _check_fits(spec, model.config.in_channels, model.config.patch_size)
    if cfg.weights_dtype == "bf16":
        model = model.to(torch.bfloat16)
    check_weights_dtype(model, cfg.weights_dtype)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.to(device).train()
    den = Denoiser(model)
    for a in algos:
        a.build(den, spec)  # refuses bad input before step 1; adds auxiliary modules and hooks
    den.aux.to(device=device, dtype=next(model.parameters()).dtype)
    parent = None
    if cfg.init_from and not cfg.resume:  # fine-tune start: the parent's weights (and SPRINT fusion)
        parent = checkpoint.load_parent(cfg.init_from, cfg.init_weights, den, spec.vae, spec.text_encoder)
        log.info("fine-tune start from %s (step %s, %s weights)", parent["init_from"], parent["step"],
                 parent["weights"])
    return model, den, parent


def _wrap(cfg: TrainConfig, den: Denoiser, algos: list[Algorithm], device: torch.device, local_rank: int):
    """The module the step calls: the denoiser, compiled (--compile: as PRX compiles its denoiser, with the
    algorithms' modules and hooks in it) and DDP-wrapped (torchrun)."""
    train_model = torch.compile(den) if cfg.compile else den
    if dist_env()[1] > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(train_model, device_ids=[local_rank] if device.type == "cuda" else None,
                                              find_unused_parameters=any(a.unused_parameters for a in algos))
    return train_model


# ------------------------------------------------------------------------------------------- one step
def _train_step(r: Run, step: int) -> None:
    """Optimizer step `step` (0-based) over grad_accum micro-batches, as in minRF: batch -> noise, t -> model ->
    loss (+ the algorithms' terms) -> backward; then clip, step, the algorithms' after-step hooks."""
    cfg = r.cfg
    r.lr = lr_at(step, cfg.lr, cfg.warmup_steps)
    set_lr(r.optimizer, r.lr)
    r.samples, r.flops = 0, 0.0
    for micro in range(cfg.grad_accum):
        batch = r.agree.fetch(r.feed.next)
        eps, t = draw_noise(batch.x0.shape, r.oc, r.generator)
        x0, emb, mask = device_inputs(batch, r.device, *r.empty, r.oc.caption_dropout, r.generator)
        kwargs = {k: v for a in r.algos for k, v in a.forward_kwargs(batch, step, micro).items()}
        with _sync_context(r, micro):
            out = step_losses(r.train_model, x0, eps.to(r.device, non_blocking=True), t.to(r.device), emb, mask,
                              r.oc, r.amp, **kwargs)
            terms = {k: v for a in r.algos for k, v in a.loss_terms(out, batch).items()}
            loss = sum(terms.values(), weighted_flow(out, batch, r.algos).mean())
            (loss / cfg.grad_accum).backward()
        r.stats.add_micro(out.flow, t, cfg.grad_accum, loss)
        r.logs.add({"flow_loss": out.flow.mean(), **terms,
                    **{k: v for a in r.algos for k, v in a.log_values(out, batch).items()}}, cfg.grad_accum)
        _count(r, batch)
    grad_norm = clip_grad(r.denoiser, cfg.grad_clip, as_tensor=True)  # aux modules (REPA, SPRINT) included
    r.optimizer.step()
    r.optimizer.zero_grad(set_to_none=True)
    for a in r.algos:
        a.after_optimizer_step(step + 1)
    r.step_loss = r.stats.end_step(grad_norm)


def weighted_flow(out, batch, algos: list[Algorithm]) -> torch.Tensor:
    """The flow loss per sample times every algorithm's per-sample weight (`loss_weights`; Min-SNR)."""
    flow = out.flow
    for a in algos:
        w = a.loss_weights(out, batch)
        if w is not None:
            flow = flow * w
    return flow


def _sync_context(r: Run, micro: int):
    """DDP reduces gradients on the last micro-batch of the step only."""
    return nullcontext() if r.world == 1 or micro == r.cfg.grad_accum - 1 else r.train_model.no_sync()


def _count(r: Run, batch) -> None:
    """Samples and training FLOPs of one micro-batch (the algorithms' routing counted)."""
    h, w = batch.x0.shape[-2:]
    extra = {k: v for a in r.algos for k, v in a.flops_kwargs(batch.x0.shape).items()}
    r.samples += len(batch)
    r.flops += len(batch) * train_flops_per_sample(dict(r.model.config), h, w, r.cfg.text_max_length, **extra)


# ------------------------------------------------------------------------------------------- log, eval, checkpoint
def _after_step(r: Run, done: int, on_step) -> None:
    """After optimizer step `done` (1-based): timing, evaluation, log line, checkpoint, metrics, on_step."""
    cfg = r.cfg
    r.clock.tick(r.samples * r.world, cfg.grad_accum)
    r.meter.tick(cfg.grad_accum, r.samples * r.world, r.flops * r.world)
    if r.eval_set is not None and done % cfg.eval_every == 0:
        _evaluate(r, done)
    log_now = done % cfg.log_every == 0 or done == cfg.steps
    if log_now or done % cfg.checkpoint_every == 0:
        # the only host sync of the step: values since the last one (raises on a non-finite loss)
        new, bins, norm = r.stats.drain(r.drained)
        r.losses.extend(new)
        r.meter.record(new, bins, norm)
        r.drained = done
    if log_now:
        _log(r, done)
    if done % cfg.checkpoint_every == 0 or done == cfg.steps:
        _save(r, done)
    if cfg.metrics_every and done % cfg.metrics_every == 0 and r.rank == 0:
        from trainer.evaluate import during_training  # on the checkpoint just saved, EMA when present

        log.info("step %d metrics: %s", done, during_training(r.run_dir, done, cfg.metrics_real, cfg.metrics_n, r.tb))
    if on_step is not None:
        on_step(done, {"loss": r.step_loss, "grad_norm": r.stats.grad_norm, "lr": r.lr})


def _evaluate(r: Run, step: int, variants: bool = True) -> None:
    """Loss on the fixed batch with the live weights, and with each algorithm's eval weights (EMA)."""
    r.evals.setdefault("", []).append((step, eval_loss(r.denoiser, *r.eval_set, r.oc, r.device, r.amp)))
    for a in r.algos if variants else ():
        swapped = a.eval_weights()
        if swapped is not None:
            with swapped:
                r.evals.setdefault(a.name, []).append(
                    (step, eval_loss(r.denoiser, *r.eval_set, r.oc, r.device, r.amp)))


def _log(r: Run, done: int) -> None:
    """The log line (rank 0): loss, bins, rates, data counts, the flow loss and the algorithms' values."""
    if r.rank == 0:
        values = {**r.meter.summary(r.lr), **r.logs.means()}
        counts = r.feed.state()["counts"]
        extra = " ".join(f"{k}={_fmt(v)}" for k, v in r.logs.means().items())
        log.info(metrics.format_line(done, r.cfg.steps, values, _count_summary(counts)) + f" | {extra}")
        now = {name: e[-1][1] for name, e in r.evals.items() if e and e[-1][0] == done}
        for name, loss in now.items():
            log.info("step %d eval/%s=%.4f (fixed batch%s)", done, _eval_key(name), loss,
                     f", {name} weights" if name else "")
        if r.tb is not None:
            _tb_write(r.tb, done, values, counts, {_eval_key(n): v for n, v in now.items()})
    r.meter.reset()
    r.logs = Means()


def _eval_key(name: str) -> str:
    return f"loss_{name}" if name else "loss"


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.4f}"


class Means:
    """Named values summed per micro-batch on the device (no host sync), averaged over steps at the log line."""

    def __init__(self):
        self.sums: dict[str, Any] = {}
        self.steps = 0.0

    def add(self, values: dict[str, Any], grad_accum: int) -> None:
        self.steps += 1.0 / grad_accum
        for k, v in values.items():
            v = v.detach() if torch.is_tensor(v) else v
            self.sums[k] = self.sums.get(k, 0.0) + v / grad_accum

    def means(self) -> dict[str, float]:
        return {k: float(v) / (self.steps or 1.0) for k, v in self.sums.items()}


class Throughput:
    """Samples and batches per second over the steps of this process after its first (warm-up, compilation),
    checkpoints written after a step not counted."""

    def __init__(self):
        self.t0 = self.t_end = 0.0
        self.steps = self.samples = self.batches = 0

    def tick(self, samples: int, batches: int) -> None:
        if self.steps == 0:
            self.t0, self.steps = time.perf_counter(), 1
            return
        self.steps += 1
        self.samples += samples
        self.batches += batches
        self.t_end = time.perf_counter()

    def rates(self) -> dict[str, Any]:
        secs = self.t_end - self.t0 if self.t_end else 0.0
        return {"samples_per_s": self.samples / secs if secs > 0 and self.samples else None,
                "batches_per_s": self.batches / secs if secs > 0 and self.batches else None,
                "timed_steps": max(0, self.steps - 1)}


def _finish(r: Run) -> dict[str, Any]:
    """counts-rank0.json and RUN/summary.json (rank 0); the run's result."""
    counts = r.feed.state()["counts"]
    if r.rank == 0:
        with open(os.path.join(r.run_dir, f"counts-rank{r.rank}.json"), "w") as fh:
            json.dump(counts, fh, indent=2)
        log.info("done: %d steps; realised counts %s", r.cfg.steps, json.dumps(counts))
        _write_summary(r)
    by_name = {a.name: a for a in r.algos}
    evals = {"eval_ema": [], **{f"eval_{name}": e for name, e in r.evals.items() if name}}
    return {"losses": r.losses, "eval": r.evals.get("", []), **evals, "counts": counts, "run_dir": r.run_dir,
            "start_step": r.start, "model": r.model, "denoiser": r.denoiser, "algorithms": by_name,
            "ema": by_name["ema"].ema if "ema" in by_name else None}


def _write_summary(r: Run) -> None:
    """RUN/summary.json: mean samples/s and batches/s (after the first step), MFU, peak memory, the algorithms."""
    if r.device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(r.device), "cuda_max_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_max_rss_process"
    out = {**r.clock.rates(), "mfu": r.meter.rates()["mfu"],  # the last rate window's (None without a known peak)
           "peak_memory_bytes": int(peak), "peak_memory_kind": kind, "steps": r.cfg.steps,
           "start_step": r.start, "final_loss": r.losses[-1] if r.losses else None,
           "algorithms": {a.name: a.summary() for a in r.algos}}
    with open(os.path.join(r.run_dir, "summary.json"), "w") as fh:
        json.dump(out, fh, indent=2, default=str)


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


def _save(r: Run, step: int) -> None:
    tmp = checkpoint.tmp_dir(r.run_dir, step)
    if r.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # what a killed save left there
        os.makedirs(tmp, exist_ok=True)
    _barrier(r.world)
    checkpoint.write_rank_files(tmp, r.rank, r.generator, r.feed.state())
    _barrier(r.world)
    if r.rank == 0:
        checkpoint.write_main(tmp, r.model, r.optimizer, {
            "step": step, "world_size": r.world, "config_hash": r.chash, "time": time.time(),
            "config": json.loads(json.dumps(content_fields(r.cfg), default=str))}, r.denoiser, r.algos)
        path = checkpoint.publish(r.run_dir, step, r.cfg.keep_checkpoints)
        log.info("saved %s", path)
    _barrier(r.world)


def _tensorboard(run_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # pragma: no cover - tensorboard is a dependency
        log.warning("tensorboard is not installed: logging to stdout only")
        return None
    return SummaryWriter(os.path.join(run_dir, "tb"))


def _tb_write(tb, step: int, values: dict, counts: dict, evals: dict[str, float]):
    for k, v in values.items():
        if v is not None:
            tb.add_scalar(f"train/{k}", v, step)
    for kind in ("source", "variant"):
        total = sum(counts[kind].values()) or 1
        for name, n in counts[kind].items():
            tb.add_scalar(f"data/{kind}/{name}", n / total, step)
    for k, v in evals.items():
        tb.add_scalar(f"eval/{k}", v, step)


class _Stdout(logging.StreamHandler):
    """Writes to whatever sys.stdout is at each record, not the stream of the first run (which may be closed)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _setup_logging(run_dir: str, rank: int):
    if rank != 0:
        log.setLevel(logging.WARNING)
        return
    log.setLevel(logging.INFO)
    if not any(getattr(h, "_prx", False) for h in log.handlers):
        fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
        out = _Stdout()
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
