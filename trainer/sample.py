"""`prx-sample`: images from a training run's checkpoint, sampled the way the run was trained.

    prx-sample --run RUN | --ckpt RUN/checkpoints/step-NNNNNNNN [--weights ema|raw] [--checkpoint STEP|last]
               --prompt TEXT | --prompts FILE [--negative-prompt TEXT] [--steps 50 --cfg 3.5 --seed 0]
               [--height H --width W] [--batch-size 8] --out DIR

- prompts go through the run's text encoder with its cleaning and max length (`contract.encoders.text`,
  what `prx-data encode` ran), then are padded / truncated to the run's `text_max_length` with a mask,
  exactly like the training batches; how many prompts were truncated is printed;
- the unconditional branch is the shards' stored empty prompt (what caption dropout trained on), or the
  encoded `--negative-prompt`;
- Euler on PRX's grid t_k = shift(linspace(1, 0, steps + 1)) with the run's `shift`:
  x <- x + (t_{k+1} - t_k) v(x, t_k); x-prediction runs convert with the trainer's (x_t - x_hat) / max(t, t_min);
- classifier-free guidance batch-doubled ([uncond; cond]) over many prompts at once: v_u + g (v_c - v_u);
- image i starts from randn(seed + i) whatever the batch size; latents are decoded by the run's VAE
  (`VAE.decode`: the inverse of the stored scaling/shift).
Writes DIR/NNNNN.png, DIR/samples.jsonl (prompt, seed, settings per image), DIR/grid.png and the effective
config DIR/sample_config.yaml, a batch at a time. Every flag is checked before anything is loaded: sizes
above --max-side, a --prompts file above MAX_PROMPTS_BYTES and an --out that is a file are refused.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import yaml

from contract.config import ConfigError, add_arguments, build_config, check_bounds, option, quote, save_yaml
from contract.errors import PrxError
from contract.models import model_name
from trainer import algorithms
from trainer.checkpoint import CKPT_RE, ckpt_dir, list_checkpoints, verify
from trainer.data import TEXT_MAX_LENGTH
from trainer.objective import shift_timesteps, velocity_from_x

RAW, EMA = "transformer", "transformer_ema"
MAX_STEPS = 1000             # Euler steps (prx-sample, prx-eval)
MAX_SEED = 2**32 - 1         # --seed (image i uses seed + i)
MAX_PROMPTS_BYTES = 8 << 20  # a --prompts file
CHARS_PER_TOKEN = 32         # a prompt is cut at this many characters per token of the encoder's max length before
                             # it is tokenized: no token is that long, so the tokens kept are the same


# ------------------------------------------------------------------------------------------- the run
@dataclass
class RunInfo:
    """A checkpoint of a training run and what the run recorded about itself."""

    run_dir: str
    ckpt: str
    step: int
    weights: str                 # "ema" or "raw"
    config: dict[str, Any]       # RUN/config.yaml (the run's effective TrainConfig; unknown keys tolerated)
    data: dict[str, Any]         # RUN/data.json (sources, vae and text_encoder records)

    @property
    def transformer_dir(self) -> str:
        return os.path.join(self.ckpt, EMA if self.weights == "ema" else RAW)

    def get(self, key: str, default=None):
        value = self.config.get(key)
        return default if value is None else value

    @property
    def empty_prompt_folder(self) -> str:
        return self.data["sources"][0]["folder"]

    def resolution(self) -> int:
        from contract.encoded import encoded_info

        return int(encoded_info(self.empty_prompt_folder).get("resolution") or 256)


def pick_checkpoint(run: str | None, ckpt: str | None, checkpoint: str = "last") -> tuple[str, str, int]:
    """(run folder, checkpoint folder, step) from --run [--checkpoint] or --ckpt."""
    if bool(run) == bool(ckpt):
        raise PrxError("give --run RUN_DIR or --ckpt RUN_DIR/checkpoints/step-NNNNNNNN (one of them)")
    if ckpt:
        ckpt = os.path.abspath(ckpt.rstrip("/"))
        m = CKPT_RE.fullmatch(os.path.basename(ckpt))
        if not m or not os.path.isdir(os.path.join(ckpt, RAW)):
            raise PrxError(f"--ckpt {ckpt}: not a checkpoint (RUN/checkpoints/step-NNNNNNNN with transformer/); "
                             "pass --run RUN_DIR to take its last checkpoint")
        return os.path.dirname(os.path.dirname(ckpt)), ckpt, int(m.group(1))
    found = list_checkpoints(run)
    if not found:
        raise PrxError(f"--run {run}: no checkpoint in {run}/checkpoints; train it with prx-train first, or pass "
                         "--ckpt with a checkpoint folder")
    if checkpoint in ("last", "", None):
        step, path = found[-1]
        return run, path, step
    if not str(checkpoint).isdigit():
        raise PrxError(f"--checkpoint {quote(checkpoint)}: use a step number or 'last'")
    by_step = dict(found)
    if int(checkpoint) not in by_step:
        raise PrxError(f"--checkpoint {checkpoint}: {run} has checkpoints at steps "
                         f"{', '.join(str(s) for s, _ in found)}")
    return run, ckpt_dir(run, int(checkpoint)), int(checkpoint)


def open_run(run: str | None = None, ckpt: str | None = None, weights: str | None = None,
             checkpoint: str = "last") -> RunInfo:
    run_dir, path, step = pick_checkpoint(run, ckpt, checkpoint)
    for name in ("config.yaml", "data.json"):
        if not os.path.isfile(os.path.join(run_dir, name)):
            raise PrxError(f"{run_dir}/{name} is missing: not a prx-train run folder")
    with open(os.path.join(run_dir, "config.yaml")) as fh:
        config = yaml.safe_load(fh) or {}
    with open(os.path.join(run_dir, "data.json")) as fh:
        data = json.load(fh)
    has_ema = os.path.isdir(os.path.join(path, EMA))
    if weights == "ema" and not has_ema:
        raise PrxError(f"{path} has no EMA weights ({EMA}/): the run was trained without --ema-decay > 0; "
                         "pass --weights raw")
    if weights not in (None, "ema", "raw"):
        raise PrxError(f"--weights {weights}: use ema or raw")
    chosen = weights or ("ema" if has_ema else "raw")
    aux = ("aux.safetensors",) if algorithms.needed_at_inference(config) else ()  # SPRINT's fusion layer
    verify(path, only=(EMA if chosen == "ema" else RAW, *aux))  # a damaged checkpoint is named, not a traceback
    return RunInfo(run_dir, path, step, chosen, config, data)


# ------------------------------------------------------------------------------------------- sampler
def timestep_grid(steps: int, shift: float) -> torch.Tensor:
    """PRX's sampling grid: shift(linspace(1, 0, steps + 1)), float64."""
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def initial_noise(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """One randn draw per image from its own seed (so image i is the same whatever the batch size)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


class Sampler:
    """The run's denoiser, text encoder, VAE and empty prompt, and the Euler + CFG loop over them."""

    def __init__(self, run: RunInfo, device: str = "cpu"):
        from diffusers import PRXTransformer2DModel

        from contract.encoded import load_empty_prompt
        from contract.encoders.text import load_text_encoder
        from contract.encoders.pixels import PixelSpace, is_pixel_space
        from contract.encoders.vae import load_vae

        self.run, self.device = run, torch.device(device)
        model = PRXTransformer2DModel.from_pretrained(run.transformer_dir).float().eval().to(self.device)
        model.requires_grad_(False)
        # a SPRINT run's fusion layer (aux.safetensors) is part of its model: then a Denoiser around the transformer
        self.model = algorithms.inference_model(model, run.config, os.path.join(run.ckpt, "aux.safetensors"),
                                                run.weights)
        te = run.data["text_encoder"]
        self.text_encoder = load_text_encoder(model_name(te), max_length=int(te.get("max_length", TEXT_MAX_LENGTH)),
                                              cleaning=te.get("cleaning", "prx"), device=device)
        self.vae = (PixelSpace() if is_pixel_space(run.data["vae"].get("class"))
                    else load_vae(model_name(run.data["vae"]), device=device))
        self.empty = load_empty_prompt(run.empty_prompt_folder)
        self.text_max_length = int(run.get("text_max_length", TEXT_MAX_LENGTH))
        self.prediction = run.get("prediction", "v")
        self.shift = float(run.get("shift", 1.0))
        self.x_pred_t_min = float(run.get("x_pred_t_min", 0.05))
        self.autocast = torch.bfloat16 if self.device.type == "cuda" else None

    @property
    def multiple(self) -> int:
        return int(self.vae.info.get("downsample", 8)) * int(self.model.config.patch_size)

    @property
    def token_limit(self) -> int:
        """Tokens of a prompt the denoiser sees: the text encoder's max length, then the run's text_max_length."""
        return min(self.text_encoder.max_length, self.text_max_length)

    def cleaned(self, prompts: list[str]) -> list[str]:
        """Prompts cut to CHARS_PER_TOKEN x the encoder's max length (a huge one is never tokenized whole), cleaned."""
        cap = CHARS_PER_TOKEN * self.text_encoder.max_length
        return [self.text_encoder.clean(p[:cap]) for p in prompts]

    def truncated(self, prompts: list[str]) -> list[bool]:
        """Whether each prompt is longer than token_limit tokens, so that the denoiser sees only its start."""
        cap = CHARS_PER_TOKEN * self.text_encoder.max_length
        counts = self.text_encoder.count_tokens(self.cleaned(prompts))
        return [len(p) > cap or n > self.token_limit for p, n in zip(prompts, counts)]

    def embed(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (B x text_max_length x D float32, B x text_max_length bool), as the trainer batches them."""
        return self.pad(self.text_encoder.encode(self.cleaned(prompts)))

    def pad(self, embeddings: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        from trainer.data import pad_embedding

        padded = [pad_embedding(e, self.text_max_length)[:2] for e in embeddings]
        return torch.stack([p[0] for p in padded]).float(), torch.stack([p[1] for p in padded])

    def velocity(self, x, t: float, emb, mask) -> torch.Tensor:
        tt = torch.full((x.shape[0],), float(t), device=x.device)
        ctx = torch.autocast(x.device.type, dtype=self.autocast) if self.autocast else _null()
        with ctx:
            out = self.model(hidden_states=x, timestep=tt, encoder_hidden_states=emb, attention_mask=mask,
                             return_dict=False)[0].float()
        return velocity_from_x(x, out, tt, self.x_pred_t_min) if self.prediction == "x" else out

    @torch.inference_mode()
    def denoise(self, noise, emb, mask, uncond_emb=None, uncond_mask=None, steps: int = 50, cfg: float = 3.5,
                grid: torch.Tensor | None = None) -> torch.Tensor:
        """Euler from t = 1 (noise) to t = 0 with CFG batch-doubled; returns denoiser-space latents (float32)."""
        grid = timestep_grid(steps, self.shift) if grid is None else grid
        x = noise.to(self.device, torch.float32)
        emb, mask = emb.to(self.device), mask.to(self.device)
        guided = cfg > 1.0
        if guided:
            both_emb = torch.cat([uncond_emb.to(self.device), emb])
            both_mask = torch.cat([uncond_mask.to(self.device), mask])
        for k in range(len(grid) - 1):
            t, t_next = float(grid[k]), float(grid[k + 1])
            if guided:
                v_u, v_c = self.velocity(torch.cat([x, x]), t, both_emb, both_mask).chunk(2)
                v = v_u + cfg * (v_c - v_u)
            else:
                v = self.velocity(x, t, emb, mask)
            x = x + (t_next - t) * v
        return x

    def generate(self, prompts: list[str], seeds: list[int], height: int, width: int, steps: int = 50,
                 cfg: float = 3.5, negative_prompt: str | None = None, batch_size: int = 8) -> torch.Tensor:
        """uint8 N x 3 x H x W images (rounded, as diffusers' postprocess); CFG batches of `batch_size` prompts."""
        from contract.encoders.vae import to_uint8

        return to_uint8(self.generate_pixels(prompts, seeds, height, width, steps, cfg, negative_prompt, batch_size))

    def generate_pixels(self, prompts: list[str], seeds: list[int], height: int, width: int, steps: int = 50,
                        cfg: float = 3.5, negative_prompt: str | None = None, batch_size: int = 8) -> torch.Tensor:
        """float32 N x 3 x H x W decoded images in [-1, 1] (before any quantisation); see `generate`."""
        check_size(height, width, self.multiple)
        down = int(self.vae.info.get("downsample", 8))
        shape = (int(self.model.config.in_channels), height // down, width // down)
        out = []
        for i in range(0, len(prompts), batch_size):
            chunk, chunk_seeds = prompts[i:i + batch_size], seeds[i:i + batch_size]
            emb, mask = self.embed(chunk)
            if negative_prompt:
                u_emb, u_mask = self.embed([negative_prompt] * len(chunk))
            else:
                u_emb, u_mask = self.pad([self.empty] * len(chunk))
            latents = self.denoise(initial_noise(shape, chunk_seeds), emb, mask, u_emb, u_mask, steps, cfg)
            out.append(self.vae.decode(latents))
        return torch.cat(out)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def check_size(height: int, width: int, multiple: int = 16) -> None:
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise PrxError(f"--height {height} --width {width}: both must be positive multiples of {multiple} "
                         f"(VAE downsampling x patch size), e.g. {max(multiple, round(height / multiple) * multiple)}")


def check_sides(height: int | None, width: int | None, max_side: int) -> None:
    """A --height or --width above --max-side is refused (memory grows with height x width x batch size)."""
    for flag, side in (("--height", height), ("--width", width)):
        if side is not None and side > max_side:
            raise PrxError(f"{flag} {side}: larger than --max-side {max_side}; pass --max-side {side} to sample "
                             "that size knowingly (memory grows with height x width x --batch-size)")


def check_cfg(cfg: float) -> None:
    if not 1.0 <= cfg < math.inf:
        raise PrxError(f"--cfg {cfg}: guidance must be >= 1 (1 = no guidance; PRX evaluates at 3.5)")


# ------------------------------------------------------------------------------------------- outputs
GRID_IMAGES = 64  # the first images of a run, in grid.png


def save_images(out_dir: str, images: torch.Tensor, records: list[dict[str, Any]], start: int = 0) -> list[str]:
    """NNNNN.png per image and one samples.jsonl line each (appending after `start`)."""
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    names = []
    with open(os.path.join(out_dir, "samples.jsonl"), "a" if start else "w") as fh:
        for j, (img, rec) in enumerate(zip(images, records)):
            name = f"{start + j:05d}.png"
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(os.path.join(out_dir, name))
            fh.write(json.dumps({"file": name, **rec}) + "\n")
            names.append(name)
    return names


def save_grid(path: str, images: torch.Tensor, max_images: int = GRID_IMAGES) -> None:
    """The first images side by side (rows of ceil(sqrt(n)), padded to the largest size)."""
    from PIL import Image

    images = images[:max_images]
    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    h = max(int(im.shape[1]) for im in images)
    w = max(int(im.shape[2]) for im in images)
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(Image.fromarray(im.permute(1, 2, 0).numpy()), ((i % cols) * w, (i // cols) * h))
    grid.save(path)


# ------------------------------------------------------------------------------------------- CLI
@dataclass
class SampleConfig:
    run: str | None = option(None, help="run folder: its last checkpoint (or --checkpoint)")
    ckpt: str | None = option(None, help="a checkpoint folder RUN/checkpoints/step-NNNNNNNN")
    checkpoint: str = option("last", help="with --run: a step number or 'last'")
    weights: str | None = option(None, choices=["ema", "raw"], help="ema (default when the run has EMA) or raw")
    prompt: str | None = option(None, help="one prompt (many: --prompts FILE)")
    prompts: str | None = option(None, help="a text file, one prompt per line")
    negative_prompt: str | None = option(None, help="unconditional branch; default: the stored empty prompt")
    steps: int = option(50, minimum=1, maximum=MAX_STEPS, help="Euler steps")
    cfg: float = option(3.5, help="classifier-free guidance scale (>= 1; 1 = none)")
    seed: int = option(0, minimum=0, maximum=MAX_SEED, help="image i starts from noise seeded seed + i")
    height: int | None = option(None, minimum=1, help="pixels (multiple of 16); default: the run's encode resolution")
    width: int | None = option(None, minimum=1, help="pixels (multiple of 16); default: the run's encode resolution")
    max_side: int = option(2048, runtime=True, minimum=16, help="largest --height / --width accepted; raise it "
                           "knowingly (memory grows with height x width x --batch-size)")
    batch_size: int = option(8, runtime=True, minimum=1, help="prompts per forward (x2 with guidance)")
    out: str | None = option(None, runtime=True, help="output folder")
    device: str = option("auto", runtime=True, help="auto (cuda if available), cpu, cuda")
    config: str | None = option(None, runtime=True, help="YAML file with any of these options; flags win")


def read_prompts(cfg: SampleConfig) -> list[str]:
    prompts = [cfg.prompt] if cfg.prompt else []
    if cfg.prompts:
        if not os.path.isfile(cfg.prompts):
            raise PrxError(f"--prompts {cfg.prompts}: no such file (one prompt per line)")
        with open(cfg.prompts, "rb") as fh:
            data = fh.read(MAX_PROMPTS_BYTES + 1)
        if len(data) > MAX_PROMPTS_BYTES:
            raise PrxError(f"--prompts {cfg.prompts}: larger than {MAX_PROMPTS_BYTES:,} bytes; split it and run "
                             "prx-sample once per part")
        try:
            prompts += [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as exc:
            raise PrxError(f"--prompts {cfg.prompts}: not UTF-8 text ({exc})") from None
    if not prompts:
        raise PrxError("no prompt: pass --prompt TEXT or --prompts FILE")
    return prompts


def pick_device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def check_flags(cfg: SampleConfig) -> None:
    """What the flags alone tell, before any file is read or model loaded."""
    if not cfg.out:
        raise PrxError("--out DIR is required")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise PrxError(f"--out {cfg.out} is a file; pass a folder (it gets NNNNN.png, samples.jsonl, grid.png)")
    check_bounds(cfg)
    check_cfg(cfg.cfg)
    check_sides(cfg.height, cfg.width, cfg.max_side)


def report_truncated(sampler: Sampler, prompts: list[str]) -> list[bool]:
    """Which prompts are longer than the text encoder keeps; prints how many are."""
    cut = sampler.truncated(prompts)
    if any(cut):
        print(f"{sum(cut)} of {len(prompts)} prompts are longer than {sampler.token_limit} tokens (what the run's "
              f"text encoder keeps): each is truncated to its first {sampler.token_limit}")
    return cut


def sample_size(cfg: SampleConfig, info: RunInfo) -> tuple[int, int]:
    """(height, width): the flags, else the run's encode resolution; checked against --max-side."""
    res = info.resolution()
    height = res if cfg.height is None else cfg.height
    width = res if cfg.width is None else cfg.width
    check_size(height, width)
    check_sides(height, width, cfg.max_side)
    return height, width


def write_batches(cfg: SampleConfig, sampler: Sampler, records: list[dict[str, Any]]) -> torch.Tensor:
    """Images sampled --batch-size prompts at a time, each batch written at once; the first GRID_IMAGES of them."""
    first: list[torch.Tensor] = []
    for i in range(0, len(records), cfg.batch_size):
        batch = records[i:i + cfg.batch_size]
        images = sampler.generate([r["prompt"] for r in batch], [r["seed"] for r in batch], batch[0]["height"],
                                  batch[0]["width"], cfg.steps, cfg.cfg, cfg.negative_prompt, cfg.batch_size)
        save_images(cfg.out, images, batch, start=i)
        first += list(images[:GRID_IMAGES - len(first)])
    return torch.stack(first)


def run_sample(cfg: SampleConfig) -> dict[str, Any]:
    check_flags(cfg)
    prompts = read_prompts(cfg)
    info = open_run(cfg.run, cfg.ckpt, cfg.weights, cfg.checkpoint)
    height, width = sample_size(cfg, info)
    sampler = Sampler(info, pick_device(cfg.device))
    check_size(height, width, sampler.multiple)
    cut = report_truncated(sampler, prompts)
    settings = {"steps": cfg.steps, "cfg": cfg.cfg, "height": height, "width": width, "shift": sampler.shift,
                "prediction": sampler.prediction, "negative_prompt": cfg.negative_prompt,
                "checkpoint": info.ckpt, "step": info.step, "weights": info.weights}
    records = [{"prompt": p, "seed": cfg.seed + i, "truncated": c, **settings}
               for i, (p, c) in enumerate(zip(prompts, cut))]
    save_grid(os.path.join(cfg.out, "grid.png"), write_batches(cfg, sampler, records))
    save_yaml(cfg, os.path.join(cfg.out, "sample_config.yaml"))
    return {"images": len(prompts), "truncated": sum(cut), "run": info, "settings": settings}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prx-sample", description=__doc__.split("\n\n")[0])
    add_arguments(parser, SampleConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_sample(build_config(SampleConfig, vars(args)))
    except (ConfigError, PrxError, FileNotFoundError, ValueError) as exc:
        print(f"prx-sample: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
