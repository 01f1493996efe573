"""`prx-train` options: one dataclass, read through the project's one config loader (contract.config).

Defaults are PRX's baseline recipe; `manifests/train/base.yaml` spells them out, and adds the recipe's encoders,
captions and run length (steps, log and checkpoint cadence), which the defaults leave open. A YAML file may name a
`base:` file it overlays (path relative to itself), so an ablation overlay is a few lines that change one
thing (`manifests/ablations/*.yaml`). Order: defaults < base file(s) < `--config` file < command line.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

from contract.config import ConfigError, build_config, option, read_yaml
from trainer.objective import ObjectiveConfig as _OBJ  # the objective's defaults live once, there
from trainer import data as _DATA  # so do the loader's

@dataclass
class TrainConfig:
    # --- data
    shards: list[str] = option(default_factory=list, help="encoded shard folder(s) (comma-separated): one source each, "
                                                          "equal weights; or use --mix")
    mix: str | None = option(None, help="mixture YAML: sources (shard folders + weights), captions, resolution")
    caption: dict[str, float] = option(default_factory=dict,
                                       help="caption-variant weights, e.g. long=0.5,short=0.5 (default: the mixture's, "
                                            "else long=1.0, PRX's baseline)")
    vae: str | None = option(None, help="VAE the shards must have been encoded with (alias, hub id or folder); "
                                        "default: whatever the first source used, all sources must agree")
    text_encoder: str | None = option(None, help="text encoder the shards must have been encoded with")
    text_max_length: int = option(_DATA.TEXT_MAX_LENGTH,
                                  help="text embeddings are padded (with a mask) to this many tokens")
    open_shards: int = option(_DATA.OPEN_SHARDS, help="shards of each source each rank reads at once (interleaved)")
    shuffle_buffer: int = option(_DATA.SHUFFLE_BUFFER,
                                 help="samples shuffled together per rank, across the open shards of every "
                                      "source (split evenly between sources); deterministic from the seed")
    loader_workers: int = option(4, runtime=True, help="loader worker processes per rank that read and collate "
                                                       "batches (0 = in the training process); the batches are the "
                                                       "same for any number")
    prefetch: int = option(2, runtime=True, help="batches each loader worker prepares ahead")
    # --- model
    model: str = option("prx-small", help="prx-small (1.17B: hidden 1792, depth 16, 28 heads, mlp 3.5, patch 2), "
                                          "tiny, or a folder holding a PRXTransformer2DModel")
    weights_dtype: str = option("fp32", choices=["fp32", "bf16"],
                                help="dtype of the trainable weights; bf16 is the BF16-storage ablation")
    fp8: bool = option(False, help="FP8 training (torchao Float8Linear for the projection layers, as PRX's "
                                   "tao_fp8.py); NVIDIA GPUs of compute capability >= 8.9 (Hopper) only")
    autocast: str = option("auto", choices=["auto", "bf16", "none"],
                           help="compute dtype: auto = BF16 autocast on CUDA, none on CPU")
    compile: bool = option(False, runtime=True, help="torch.compile the denoiser")
    gradient_checkpointing: bool = option(False, runtime=True, help="recompute block activations in backward")
    # --- objective
    prediction: str = option(_OBJ.prediction, choices=["v", "x"],
                             help="v: the model predicts eps - x0; x: it predicts x0, loss in v-space via (x_t - x)/max(t, t_min)")
    x_pred_t_min: float = option(_OBJ.x_pred_t_min, help="clamp of t in the x-prediction velocity (x_t - x)/max(t, t_min)")
    logit_mean: float = option(_OBJ.logit_mean, help="timestep sampling: t = sigmoid(N(logit_mean, logit_std))")
    logit_std: float = option(_OBJ.logit_std, help="timestep sampling: std of the logit-normal")
    uniform_fraction: float = option(_OBJ.uniform_fraction, help="fraction of timesteps drawn uniformly on [1e-3, 1) instead")
    shift: float = option(_OBJ.shift, help="timestep shift s: t' = s t / (1 + (s - 1) t); 1 = none")
    caption_dropout: float = option(_OBJ.caption_dropout, help="probability of training on the empty prompt (its embedding and mask)")
    # --- optimisation
    steps: int = option(1000, help="optimizer steps")
    batch_size: int = option(32, help="samples per micro-batch per process")
    grad_accum: int = option(1, help="micro-batches per optimizer step")
    lr: float = option(1e-4, help="AdamW learning rate (after warmup)")
    beta1: float = option(0.9, help="AdamW beta1")
    beta2: float = option(0.95, help="AdamW beta2")
    adam_eps: float = option(1e-15, help="AdamW epsilon")
    weight_decay: float = option(0.0, help="AdamW weight decay")
    warmup_steps: int = option(1000, help="linear warmup steps, then constant")
    grad_clip: float = option(0.2, help="clip the global gradient norm to this (0 = off)")
    seed: int = option(0, help="seed of the model init, data order, mixture draws, noise and timesteps")
    # --- PRX ablations: Muon in trainer/optim.py; the training algorithms in trainer/algorithms/ (docs/ablations.md)
    optimizer: str = option("adamw", choices=["adamw", "muon"],
                            help="adamw; muon = torch.optim.Muon for the 2-D weights of the blocks, AdamW for the rest")
    muon_momentum: float = option(0.95, help="Muon momentum")
    muon_nesterov: bool = option(True, help="Muon Nesterov momentum")
    muon_ns_steps: int = option(5, help="Muon Newton-Schulz iterations")
    muon_weight_decay: float = option(0.0, help="Muon weight decay (torch's default is 0.1; PRX uses 0)")
    muon_adjust_lr: str = option("match_rms_adamw", choices=["original", "match_rms_adamw"],
                                 help="Muon's per-matrix LR scaling; match_rms_adamw = PRX's rms_scale (the AdamW lr fits)")
    repa_weight: float = option(0.0, help="REPA loss weight (0 = off): -w x mean cos(proj(h), stored features)")
    repa_block: int = option(7, help="block (0-based) whose output the REPA projector reads")
    repa_until_step: int = option(0, help="stop REPA after this many steps (burn-in; 0 = never)")
    repa_variant: str = option("repa", choices=["repa", "irepa"],
                               help="repa: MLP projector; irepa: spatially normalised targets and a spatial "
                                    "projector (PRX's iREPA)")
    irepa_projector: str = option("attention", choices=["attention", "conv"],
                                  help="iREPA's projector: attention (2-D RoPE; PRX's iREPA configs) or a 3x3 conv")
    repa_encoder: str = option("any", choices=["any", "dinov2", "dinov3"],
                               help="the teacher the stored REPA features must come from (any = whichever)")
    routing: str = option("none", choices=["none", "tread", "sprint"],
                          help="token routing during training: TREAD (tokens skip blocks) or SPRINT (sparse middle + fusion)")
    route_start: int = option(2, help="first routed block (0-based)")
    route_end: int = option(12, help="last routed block: routed blocks are route_start .. route_end (PRX: 2 .. 12), "
                                     "tokens rejoin after it")
    route_ratio: float | None = option(None, help="fraction of image tokens routed past the blocks, in (0, 1) "
                                                  "(default 0.5 for tread, 0.75 for sprint)")
    ema_decay: float = option(0.0, help="EMA of the weights, constant decay in [0, 1) (0 = off; PRX: 0.999)")
    ema_every: int = option(10, help="update the EMA every N optimizer steps")
    contrastive_weight: float = option(0.0, help="contrastive flow matching (0 = off; PRX: 0.05): loss -= w x "
                                                 "MSE(prediction, the target rolled by one in the batch)")
    min_snr_gamma: float = option(0.0, help="Min-SNR loss weighting (0 = off; the usual gamma: 5): the v-space loss "
                                            "weighted by min(SNR(t), gamma) t^2 (not in PRX)")
    lpips_weight: float = option(0.0, help="LPIPS (VGG) loss weight (0 = off; PRX: 0.1): loss += w x mean "
                                           "LPIPS(x0 prediction, x0) in pixels; x-prediction only")
    lpips_weights: str | None = option(None, help="state dict of lpips.LPIPS(net='vgg') (.pth or .safetensors), "
                                                  "needed by --lpips-weight; make it with "
                                                  "python -m trainer.algorithms.lpips_weights --write-weights FILE")
    lpips_resize: float = option(1.0, help="scale factor of the images before LPIPS (bilinear; PRX's JiT: 0.5)")
    pdino_weight: float = option(0.0, help="P-DINO loss weight (0 = off; PRX: 0.01): loss += w x mean over "
                                           "patches of 1 - cos(DINO(x0 prediction), DINO(x0)); x-prediction only")
    pdino_encoder: str = option("dinov2-b", help="P-DINO's frozen DINOv2 (alias, hub id or folder)")
    pdino_resolution: int = option(224, help="images resized to this square size (bilinear) before P-DINO's DINOv2")
    resolution_aware: str = option("none", choices=["none", "vec", "token"],
                                   help="condition on the latent's (H, W): vec = added to the timestep vector "
                                        "(diffusers' resolution_embeds); token = two tokens before the text (PRX's "
                                        "configs; prx-export refuses it)")
    init_from: str | None = option(None, help="fine-tune start: weights only from RUN (latest checkpoint) or a "
                                              "checkpoint folder; step 0, new optimizer")
    init_weights: str = option("raw", choices=["raw", "ema"], help="with --init-from: the parent's raw or EMA weights")
    # --- run folder, logging, checkpoints
    out: str | None = option(None, runtime=True, help="run folder (config, logs, TensorBoard, checkpoints)")
    resume: str | None = option(None, runtime=True, help="run folder to resume from its latest checkpoint")
    config: str | None = option(None, runtime=True, help="YAML file with any of these options; flags win")
    base: str | None = option(None, runtime=True, help="(in YAML) a config file this one overlays, relative to it")
    log_every: int = option(10, runtime=True, help="log to stdout/TensorBoard every N steps")
    rate_window: int = option(20, runtime=True, help="steps in the rolling window of batches/s, samples/s and MFU")
    checkpoint_every: int = option(1000, runtime=True, help="save a checkpoint every N steps (and at the end)")
    keep_checkpoints: int = option(2, runtime=True, help="checkpoints kept (oldest deleted); 0 = all")
    eval_every: int = option(0, runtime=True, help="loss on a fixed evaluation batch (fixed x0, noise, t) every "
                                                   "N steps; 0 = off")
    eval_batch_size: int = option(8, runtime=True, help="size of the fixed evaluation batch")
    tensorboard: bool = option(True, runtime=True, help="write TensorBoard events to OUT/tb")
    peak_tflops: float | None = option(None, runtime=True, help="device peak (dense BF16 TFLOP/s) for MFU when "
                                                                "the GPU is not in the built-in table")
    device: str = option("auto", runtime=True, help="auto (cuda if available), cpu, cuda")
    # --- evaluation during training
    metrics_every: int = option(0, runtime=True, help="CMMD, DINO-MMD and CLIP score (trainer.evaluate) on the "
                                                      "checkpoint every N steps (a multiple of --checkpoint-every); 0 = off")
    metrics_real: str | None = option(None, runtime=True, help="real shard folder (images + captions) for --metrics-every")
    metrics_n: int = option(1000, runtime=True, help="samples generated for --metrics-every")

    def __post_init__(self):
        from trainer.model import PRESETS

        if self.model not in PRESETS and not os.path.isdir(self.model):
            raise ConfigError(f"--model {self.model!r}: use {' or '.join(PRESETS)} or a folder holding a "
                              "PRXTransformer2DModel")
        for name in ("steps", "batch_size", "grad_accum", "text_max_length", "open_shards", "shuffle_buffer",
                     "eval_batch_size", "prefetch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0.0 <= self.caption_dropout <= 1.0 or not 0.0 <= self.uniform_fraction <= 1.0:
            raise ConfigError("--caption-dropout and --uniform-fraction are probabilities in [0, 1]")
        if self.loader_workers < 0:
            raise ConfigError("--loader-workers must be 0 or more")
        if self.shift <= 0:
            raise ConfigError("--shift must be positive")
        if self.caption:
            check_weights(self.caption, "--caption weights")
        if self.metrics_every and (not self.metrics_real or self.metrics_every % self.checkpoint_every):
            raise ConfigError("--metrics-every N needs --metrics-real DIR and N a multiple of --checkpoint-every "
                              f"({self.checkpoint_every}): metrics are computed on the saved checkpoint")
        self._check_ablations()

    def _check_ablations(self):
        """PRX ablation keys; checks that need the model (block indices vs depth) run in the algorithms' build."""
        if self.routing != "none" and self.route_ratio is None:
            self.route_ratio = {"tread": 0.5, "sprint": 0.75}[self.routing]
        if self.route_ratio is not None and not 0.0 < self.route_ratio < 1.0:
            raise ConfigError(f"--route-ratio {self.route_ratio}: the routed fraction must be in (0, 1), "
                              "e.g. 0.5 (TREAD) or 0.75 (SPRINT)")
        if self.routing != "none" and not 0 <= self.route_start < self.route_end:
            raise ConfigError(f"--route-start {self.route_start} / --route-end {self.route_end}: need "
                              "0 <= route_start < route_end (routed blocks are route_start .. route_end)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"--ema-decay {self.ema_decay} must be in [0, 1), e.g. 0.999 (0 = no EMA)")
        if self.ema_every < 1 or self.muon_ns_steps < 1:
            raise ConfigError("--ema-every and --muon-ns-steps must be at least 1")
        if self.repa_weight < 0 or self.repa_block < 0 or self.repa_until_step < 0:
            raise ConfigError("--repa-weight, --repa-block and --repa-until-step must be >= 0")
        if self.contrastive_weight < 0 or self.min_snr_gamma < 0:
            raise ConfigError("--contrastive-weight and --min-snr-gamma must be >= 0 (0 = off)")
        if self.lpips_weight < 0 or self.pdino_weight < 0:
            raise ConfigError("--lpips-weight and --pdino-weight must be >= 0 (0 = off)")
        if not 0.0 < self.lpips_resize <= 1.0 or self.pdino_resolution < 14:
            raise ConfigError("--lpips-resize must be in (0, 1] and --pdino-resolution at least 14 (one DINO patch)")
        if not 0.0 <= self.muon_momentum < 1.0 or self.muon_weight_decay < 0:
            raise ConfigError("--muon-momentum must be in [0, 1) and --muon-weight-decay >= 0")
        if self.init_weights == "ema" and not self.init_from:
            raise ConfigError("--init-weights ema needs --init-from RUN|CHECKPOINT")


def _file_values(path: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The values a YAML file sets (following `base:` links; paths in files resolved against the file)."""
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"{path}: `base:` links loop ({' -> '.join(seen + (path,))})")
    raw = read_yaml(path)
    cfg = build_config(TrainConfig, {}, path)  # validates names and types the one way the project does
    here = os.path.dirname(path)
    values: dict[str, Any] = {}
    if cfg.base:
        values.update(_file_values(os.path.join(here, cfg.base), seen + (path,)))
    for f in dataclasses.fields(TrainConfig):
        key_set = f.name in raw or f.name.replace("_", "-") in raw
        if f.name in ("config", "base") or not key_set:
            continue
        value = getattr(cfg, f.name)
        if f.name == "mix" and value and not os.path.isabs(value) and "://" not in value:
            value = _relative(value, here)
        if f.name == "shards" and value:
            value = [_relative(v, here) if not os.path.isabs(v) and "://" not in v else v for v in value]
        values[f.name] = value
    return values


def _relative(path: str, here: str) -> str:
    """A path in a YAML file: as written if it exists from the working folder, else relative to the file."""
    return path if os.path.exists(path) else os.path.normpath(os.path.join(here, path))


# What `--resume RUN` may change (as a flag or in a --config file): how long, how it logs and checkpoints, how
# the work is spread (the batches do not depend on the loader's workers). Anything else would make the
# continued run a different run; it is refused, naming the option. Add an option here only if changing it
# mid-run leaves the run's result the same.
SAFE_ON_RESUME = frozenset({
    "steps", "log_every", "rate_window", "checkpoint_every", "keep_checkpoints", "tensorboard", "eval_every",
    "peak_tflops", "loader_workers", "prefetch", "compile", "gradient_checkpointing",
})
_INVOCATION = {"resume", "config", "base", "out"}  # how the run was started, not what it is


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """The same config with local data paths (and --lpips-weights) made absolute (so RUN/config.yaml works from
    any folder)."""
    def fix(p: str) -> str:
        return p if "://" in p or os.path.isabs(p) else os.path.abspath(p)

    return dataclasses.replace(cfg, shards=[fix(p) for p in cfg.shards], mix=fix(cfg.mix) if cfg.mix else cfg.mix,
                               lpips_weights=fix(cfg.lpips_weights) if cfg.lpips_weights else cfg.lpips_weights)


def unsafe_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Options whose value differs between a saved run and a resumed one and that may not change."""
    return sorted(k for k in now if k in saved and k not in SAFE_ON_RESUME and k not in _INVOCATION
                  and saved[k] != now[k])


def refuse_unsafe(changed: list[str], saved: dict[str, Any], now: dict[str, Any], run: str) -> None:
    if changed:
        what = "; ".join(f"--{k.replace('_', '-')} {now[k]!r} (the run has {saved[k]!r})" for k in changed)
        raise ConfigError(f"--resume {run}: cannot change {what}. A resumed run keeps its config; it may change "
                          f"only {', '.join('--' + k.replace('_', '-') for k in sorted(SAFE_ON_RESUME))}. "
                          "Drop the flag, or start a new run with --out")


def _resume_config(cli: dict[str, Any]) -> TrainConfig:
    """`--resume RUN [safe flags]`: RUN/config.yaml, overlaid with the flags (and --config file) that may change."""
    run = cli["resume"]
    saved_path = os.path.join(run, "config.yaml")
    if not os.path.isfile(saved_path):
        raise ConfigError(f"--resume {run}: no config.yaml in it; not a prx-train run folder (start one with --out)")
    saved = _file_values(saved_path)
    given: dict[str, Any] = {}
    if cli.get("config"):
        given.update({k: v for k, v in _file_values(cli["config"]).items() if k != "out"})  # a file's out: ignored
    given.update({k: v for k, v in cli.items() if k not in ("resume", "config")})
    if given.get("init_from") and given["init_from"] != saved.get("init_from"):
        raise ConfigError(f"--resume continues {run} exactly, --init-from {given['init_from']} starts a new run "
                          "from a parent's weights: pass one of them, not both")
    if given.get("out") and os.path.abspath(given["out"]) != os.path.abspath(run):
        raise ConfigError(f"--out {given['out']}: a resumed run continues in its own folder {run}; drop --out "
                          "(or start a new run with --out and no --resume)")
    before = absolute_paths(build_config(TrainConfig, {**saved, "config": None}))
    after = absolute_paths(build_config(TrainConfig, {**saved, **given, "config": None}))
    now = {k: getattr(after, k) for k in given}
    refuse_unsafe(unsafe_changes({k: getattr(before, k) for k in given}, now), dataclasses.asdict(before), now, run)
    return dataclasses.replace(after, resume=run, out=run, config=cli.get("config"), base=None)


def load_config(cli: dict[str, Any] | None = None) -> TrainConfig:
    """Effective config: defaults < base file chain < --config file < command-line values.
    With --resume RUN: RUN/config.yaml < the options that may change (SAFE_ON_RESUME)."""
    cli = dict(cli or {})
    if cli.get("resume"):
        return _resume_config(cli)
    values: dict[str, Any] = {}
    if cli.get("config"):
        values.update(_file_values(cli["config"]))
        values["config"] = cli["config"]
    values.update(cli)
    return build_config(TrainConfig, values)


@dataclass
class Source:
    name: str
    folder: str
    weight: float


@dataclass
class Mixture:
    sources: list[Source]
    captions: dict[str, float]
    resolution: int | None = None


def load_mixture(cfg: TrainConfig) -> Mixture:
    """Sources and caption weights from --mix and/or --shards; --caption wins over the mixture's captions."""
    sources: list[Source] = []
    captions: dict[str, float] = {}
    resolution = None
    if cfg.mix:
        data = read_yaml(cfg.mix)
        unknown = set(data) - {"sources", "captions", "resolution", "description"}
        if unknown:
            raise ConfigError(f"{cfg.mix}: unknown key(s) {sorted(unknown)}; known: sources, captions, resolution, "
                              "description")
        here = os.path.dirname(os.path.abspath(cfg.mix))
        raw = data.get("sources") or {}
        if not isinstance(raw, dict) or not raw:
            raise ConfigError(f"{cfg.mix}: `sources` must map a source name to {{shards: DIR, weight: W}}")
        for name, spec in raw.items():
            if isinstance(spec, str):
                spec = {"shards": spec}
            if not isinstance(spec, dict) or "shards" not in spec:
                raise ConfigError(f"{cfg.mix}: source {name!r} needs `shards: DIR`")
            folder = str(spec["shards"])
            if "://" not in folder and not os.path.isabs(folder):
                folder = _relative(folder, here)
            weight = float(spec.get("weight", 1.0))
            sources.append(Source(str(name), folder, weight))
        captions = {str(k): float(v) for k, v in (data.get("captions") or {}).items()}
        resolution = data.get("resolution")
    if cfg.shards:
        if sources:
            raise ConfigError("give either --shards or --mix (whose sources list the shard folders), not both")
        from trainer.data import audit_source_name

        names: dict[str, int] = {}
        for folder in cfg.shards:
            # named as `prx-data audit` names the data (the samples' json `source`), else by the folder
            base = audit_source_name(folder) or os.path.basename(folder.rstrip("/")) or folder
            names[base] = names.get(base, 0) + 1
            name = base if names[base] == 1 else f"{base}-{names[base]}"
            sources.append(Source(name, folder, 1.0))
    if not sources:
        raise ConfigError("no data: pass --shards ENCODED_DIR or --mix MIXTURE.yaml")
    check_weights({s.name: s.weight for s in sources}, "source weights")
    if cfg.caption:
        captions = dict(cfg.caption)
    if not captions:
        captions = {"long": 1.0}  # PRX's baseline: the long recaption only
    return Mixture(sources, check_weights(captions, "caption weights"), resolution)


def check_weights(weights: dict[str, float], what: str) -> dict[str, float]:
    """The one rule for the weights a draw picks by (caption variants, sources): each finite and >= 0, and a
    positive sum. Returns `weights`; a ConfigError naming `what` otherwise."""
    if any(not math.isfinite(w) or w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ConfigError(f"{what} must be finite and >= 0 with a positive sum, got {weights}")
    return weights
