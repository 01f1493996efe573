"""Every GPU path in one go, on one GPU, real architectures with random weights, nothing downloaded.

    python bench/gpu.py --out bench-out/gpu              # one GPU, about 10 minutes
    python bench/gpu.py --dry-run --out /tmp/gpu-dry     # CPU, tiny shapes: checks the script, not the speed

SECTIONS runs in order; each builds its models from the architecture configs in bench/model-configs (the
published config.json layouts, no weights; with --dry-run from the seeded tiny models of the same classes),
times the project's own code path and returns rows (what, figure, note):
- train:     `prx-small` (diffusers PRXTransformer2DModel, 1.17B) at 256 px, the trainer's objective
             (`trainer.objective.per_sample_loss`) + backward + AdamW with PRX's settings, BF16 autocast over
             FP32 weights, torch.compile off and on; samples/s and MFU (`trainer.model.train_flops_per_sample`,
             peak from `trainer.metrics`).
- train-pixel: the same step in pixel space (`--vae none`): `prx-jit-32-small` (patch 32, bottleneck 256) on
             3-channel 256 px crops, x-prediction with shift 3 (manifests/ablations/jit-pixel.yaml).
- encode:    the FLUX.1 VAE (diffusers AutoencoderKL) encode at 256 px and the T5Gemma-2B encoder
             (transformers T5GemmaEncoderModel) at 256 tokens, BF16 autocast: images/s, captions/s.
- encode-spaces: FLUX.2's VAE (AutoencoderKLFlux2) and DC-AE f32c32 (AutoencoderDC) through the encode stage's
             VAE.encode at 256 px: images/s.
- decode:    `--decode cpu` vs `--decode gpu`: JPEG decode + 256 px centre crop, Pillow in one CPU thread vs
             torchvision's nvJPEG + resize_box on the GPU: images/s.
- recaption: Qwen2-VL-2B (transformers Qwen2VLForConditionalGeneration.generate, what the transformers
             backend calls), a batch of images of 256 vision tokens each (synthetic patches of the
             processor's output shape), sampled, a fixed number of new tokens: captions/s, tokens/s.
- sample:    prx-sample's Euler + CFG loop over `prx-small`, 50 steps, cfg 3.5, prompts batched vs one per call.
- extractors: prx-eval's Inception-v3 (torch-fidelity), CLIP ViT-L/14-336 (open_clip), DINOv2-L (transformers).
- fp8:       `prx-train --fp8` (torchao Float8Linear) against BF16 autocast, 300 steps on random data, compiled:
             ms/step and the loss at the end (a GPU of compute capability >= 8.9 only; a "skipped" row elsewhere).
Writes OUT/gpu.json and OUT/gpu.md: the device, driver, torch and CUDA versions, the date, every row.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model-configs")


@dataclass
class Shapes:
    """Sizes for a real run, or tiny ones for --dry-run."""

    model: str = "prx-small"
    text_dim: int = 2304         # T5Gemma-2B's width
    batch: int = 32
    latent: int = 32             # 256 px / 8
    text_len: int = 256
    steps: int = 10
    compile: tuple = (False, True)
    image: int = 256
    vlm_batch: int = 16
    vlm_grid: int = 32           # 32 x 32 patches of 14 px = 448 px -> 256 vision tokens after the 2x2 merge
    new_tokens: int = 128
    fp8_steps: int = 300         # the FP8 section's training steps (FP8 against BF16 autocast)
    pixel_model: str = "prx-jit-32-small"  # pixel space: PRX's JiT model (trainer/model.py PRESETS)

    @classmethod
    def dry(cls) -> "Shapes":
        return cls(model="tiny", text_dim=32, batch=2, latent=8, text_len=16, steps=2, compile=(False,), image=32,
                   vlm_batch=2, vlm_grid=4, new_tokens=4, fp8_steps=2,
                   pixel_model="tiny-pixel")


@dataclass
class Ctx:
    device: str
    shapes: Shapes
    dry_run: bool
    tiny_dir: str

    def sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def autocast(self):
        import torch

        return torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.device == "cuda")


def timed(ctx: Ctx, fn: Callable[[], None], steps: int) -> float:
    """Seconds per call, after one warm-up call."""
    fn()
    ctx.sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    ctx.sync()
    return (time.perf_counter() - t0) / steps


def _tiny(ctx: Ctx, name: str) -> str:
    from testing.tiny_models import build

    return build(ctx.tiny_dir, [name])[name]


# ------------------------------------------------------------------------------------ sections
def section_train(ctx: Ctx) -> list[tuple[str, str, str]]:
    import torch

    from trainer.metrics import device_peak_flops
    from trainer.model import build_model, model_config, train_flops_per_sample
    from trainer.objective import ObjectiveConfig, draw_noise, per_sample_loss

    s = ctx.shapes
    cfg = model_config(s.model, 16, s.text_dim)
    flops = train_flops_per_sample(cfg, s.latent, s.latent, s.text_len)
    peak = device_peak_flops(torch.device(ctx.device))
    rows = []
    for compiled in s.compile:
        model = build_model(s.model, 16, s.text_dim).to(ctx.device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-15, weight_decay=0.0)
        net = torch.compile(model) if compiled else model
        gen = torch.Generator().manual_seed(0)
        x0 = torch.randn(s.batch, 16, s.latent, s.latent, generator=gen)
        eps, t = draw_noise(x0.shape, ObjectiveConfig(), gen)
        emb = torch.randn(s.batch, s.text_len, s.text_dim, generator=gen).to(ctx.device, torch.bfloat16)
        mask = torch.ones(s.batch, s.text_len, dtype=torch.bool, device=ctx.device)
        x0, eps, t = x0.to(ctx.device), eps.to(ctx.device), t.to(ctx.device)
        dtype = torch.bfloat16 if ctx.device == "cuda" else None

        def step():
            loss = per_sample_loss(net, x0, eps, t, emb, mask, ObjectiveConfig(), dtype).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.2)
            opt.step()
            opt.zero_grad(set_to_none=True)

        sec = timed(ctx, step, s.steps)
        sps = s.batch / sec
        mfu = f"MFU {100 * flops * sps / peak:.1f}%" if peak else "MFU n/a (no peak for this device)"
        rows.append((f"train {s.model}, compile {'on' if compiled else 'off'}",
                     f"{sps:.1f} samples/s", f"batch {s.batch}, {s.latent * 8} px, BF16 autocast; {mfu}"))
        del model, opt, net
    return rows


def section_encode(ctx: Ctx) -> list[tuple[str, str, str]]:
    import torch
    from diffusers import AutoencoderKL
    from transformers import T5GemmaConfig, T5GemmaEncoderModel

    s = ctx.shapes
    if ctx.dry_run:
        vae_cfg = AutoencoderKL.load_config(os.path.join(_tiny(ctx, "tiny-flux-vae"), "config.json"))
        text_cfg = T5GemmaConfig.from_pretrained(_tiny(ctx, "tiny-t5gemma"))
    else:
        vae_cfg = AutoencoderKL.load_config(os.path.join(CONFIGS, "flux1-dev-vae.json"))
        full = T5GemmaConfig.from_dict(json.load(open(os.path.join(CONFIGS, "t5gemma-2b-2b-ul2.json"))))
        text_cfg = T5GemmaConfig(encoder=full.encoder.to_dict(), is_encoder_decoder=False, vocab_size=full.vocab_size)
    vae = AutoencoderKL.from_config(vae_cfg).to(ctx.device).eval().requires_grad_(False)
    enc = T5GemmaEncoderModel(text_cfg).to(ctx.device).eval().requires_grad_(False)
    x = torch.rand(s.batch, 3, s.image, s.image, device=ctx.device) * 2 - 1
    ids = torch.randint(4, text_cfg.vocab_size, (s.batch, s.text_len), device=ctx.device)
    mask = torch.ones_like(ids)

    def run_vae():
        with torch.inference_mode(), ctx.autocast():
            vae.encode(x).latent_dist.mean

    def run_text():
        with torch.inference_mode(), ctx.autocast():
            enc(input_ids=ids, attention_mask=mask).last_hidden_state

    t_vae, t_text = timed(ctx, run_vae, s.steps), timed(ctx, run_text, s.steps)
    return [("encode: FLUX.1 VAE", f"{s.batch / t_vae:.1f} images/s", f"{s.image} px, batch {s.batch}, BF16 autocast"),
            ("encode: T5Gemma-2B encoder", f"{s.batch / t_text:.1f} captions/s",
             f"{s.text_len} tokens, batch {s.batch}, BF16 autocast")]


def section_encode_spaces(ctx: Ctx) -> list[tuple[str, str, str]]:
    """The other latent spaces' encoders through the encode stage's own `VAE.encode` (contract/encoders/vae.py):
    FLUX.2's AutoencoderKLFlux2 (posterior moments) and DC-AE f32c32 (deterministic latent), BF16 autocast."""
    import torch
    from diffusers import AutoencoderDC, AutoencoderKLFlux2

    from contract.encoders.vae import DETERMINISTIC, VAE

    s, rows = ctx.shapes, []
    for label, cls, config, tiny, extra in (
            ("FLUX.2 VAE", AutoencoderKLFlux2, "flux2-dev-vae.json", "tiny-flux2-vae", {}),
            ("DC-AE f32c32", AutoencoderDC, "dc-ae-f32c32-sana.json", "tiny-dc-ae", {"posterior": DETERMINISTIC})):
        path = os.path.join(_tiny(ctx, tiny), "config.json") if ctx.dry_run else os.path.join(CONFIGS, config)
        model = cls.from_config(cls.load_config(path)).to(ctx.device).eval().requires_grad_(False)
        vae = VAE(model, None, extra, ctx.device, ctx.device == "cuda")
        x = torch.rand(s.batch, 3, s.image, s.image) * 2 - 1
        sec = timed(ctx, lambda: vae.encode(x), s.steps)
        rows.append((f"encode: {label}", f"{s.batch / sec:.1f} images/s",
                     f"{s.image} px, batch {s.batch}, BF16 autocast, the encode stage's VAE.encode"))
        del model, vae
    return rows


def section_recaption(ctx: Ctx) -> list[tuple[str, str, str]]:
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    s = ctx.shapes
    if ctx.dry_run:
        cfg = Qwen2VLConfig.from_pretrained(_tiny(ctx, "tiny-qwen2-vl"))
    else:
        cfg = Qwen2VLConfig.from_dict(json.load(open(os.path.join(CONFIGS, "qwen2-vl-2b-instruct.json"))))
    dtype = torch.bfloat16 if ctx.device == "cuda" else torch.float32
    model = Qwen2VLForConditionalGeneration(cfg).to(ctx.device, dtype).eval()
    v = cfg.vision_config
    merge = v.spatial_merge_size
    n_img = s.vlm_grid * s.vlm_grid // (merge * merge)
    prompt = [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id] + [11] * 24
    ids = torch.tensor([prompt] * s.vlm_batch, device=ctx.device)
    pixels = torch.randn(s.vlm_batch * s.vlm_grid * s.vlm_grid, v.in_channels * v.temporal_patch_size * v.patch_size ** 2,
                         device=ctx.device, dtype=dtype)
    grid = torch.tensor([[1, s.vlm_grid, s.vlm_grid]] * s.vlm_batch, device=ctx.device)

    def run():
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                           image_grid_thw=grid, do_sample=True, temperature=0.7, top_p=0.8, top_k=20,
                           max_new_tokens=s.new_tokens, min_new_tokens=s.new_tokens)

    sec = timed(ctx, run, max(1, s.steps // 5))
    return [("recaption: Qwen2-VL-2B generate", f"{s.vlm_batch / sec:.2f} captions/s",
             f"{s.vlm_batch * s.new_tokens / sec:.0f} new tokens/s; batch {s.vlm_batch}, {n_img} vision tokens "
             f"per image, {s.new_tokens} new tokens, {str(dtype).split('.')[-1]}")]


def section_sample(ctx: Ctx) -> list[tuple[str, str, str]]:
    """prx-sample's Euler + CFG loop (`trainer.sample.Sampler.denoise`) over `prx-small`: many prompts batched
    against one prompt per call (what a `PRXPipeline` loop does; diffusers 0.42.1 refuses several prompts with
    guidance > 1). Text encoding and VAE decode are left out: they are the encode section's models."""
    import torch

    from trainer.model import build_model
    from trainer.sample import Sampler, initial_noise

    s = ctx.shapes
    sampler = Sampler.__new__(Sampler)  # the loop only: no run folder, text encoder or VAE to load here
    sampler.model = build_model(s.model, 16, s.text_dim).to(ctx.device).eval().requires_grad_(False)
    sampler.device, sampler.prediction, sampler.shift, sampler.x_pred_t_min = torch.device(ctx.device), "v", 1.0, 0.05
    sampler.autocast = torch.bfloat16 if ctx.device == "cuda" else None
    steps, n = (50, s.vlm_batch) if not ctx.dry_run else (2, 2)
    emb = torch.randn(n, s.text_len, s.text_dim)
    mask = torch.ones(n, s.text_len, dtype=torch.bool)
    noise = initial_noise((16, s.latent, s.latent), list(range(n)))

    def batched():
        sampler.denoise(noise, emb, mask, emb, mask, steps=steps, cfg=3.5)

    def one_by_one():
        for i in range(n):
            sampler.denoise(noise[i:i + 1], emb[i:i + 1], mask[i:i + 1], emb[i:i + 1], mask[i:i + 1], steps=steps,
                            cfg=3.5)

    t_batch, t_one = timed(ctx, batched, 1), timed(ctx, one_by_one, 1)
    note = f"{s.model}, {s.latent * 8} px, {steps} steps, cfg 3.5 (batch-doubled), {n} prompts"
    return [("sample: prx-sample loop, prompts batched", f"{n / t_batch:.2f} images/s", note),
            ("sample: one prompt per call", f"{n / t_one:.2f} images/s", f"ratio batched / one {t_one / t_batch:.2f}")]


def section_extractors(ctx: Ctx) -> list[tuple[str, str, str]]:
    """prx-eval's feature extractors on uint8 images: Inception-v3 (FID, torch-fidelity), CLIP ViT-L/14-336
    (CMMD, open_clip), DINOv2-L with registers (DINO-MMD, transformers); random weights."""
    import tempfile

    import torch

    from testing.tiny_models import inception_state_dict
    from trainer.extractors import ClipExtractor, DinoExtractor, InceptionExtractor

    n = 2 if ctx.dry_run else 64
    tmp = tempfile.mkdtemp(prefix="prx-gpu-bench-")
    weights = os.path.join(tmp, "inception.pth")
    torch.save(inception_state_dict(0), weights)
    if ctx.dry_run:
        clip, dino = _tiny(ctx, "tiny-clip"), _tiny(ctx, "tiny-dinov2")
    else:
        from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

        clip, dino = "ViT-L-14-336-quickgelu", os.path.join(tmp, "dinov2")
        cfg = Dinov2WithRegistersConfig.from_dict(json.load(open(os.path.join(CONFIGS,
                                                                            "dinov2-with-registers-large.json"))))
        Dinov2WithRegistersModel(cfg).save_pretrained(dino)
    images = torch.randint(0, 256, (n, 3, 256, 256), dtype=torch.uint8)
    rows = []
    for label, make in (("Inception-v3 (FID)", lambda: InceptionExtractor(weights, ctx.device)),
                        ("CLIP ViT-L/14-336 (CMMD)", lambda: ClipExtractor(clip, ctx.device)),
                        ("DINOv2-L registers (DINO-MMD)", lambda: DinoExtractor(dino, ctx.device))):
        ext = make()
        sec = timed(ctx, lambda: ext(images), 1)
        rows.append((f"extractor: {label}", f"{n / sec:.1f} images/s", f"{n} uint8 256 px images, batch "
                     f"{ext.batch_size}, FP32"))
        del ext
    return rows


def section_fp8(ctx: Ctx) -> list[tuple[str, str, str]]:
    """`prx-train --fp8` (trainer/algorithms/fp8.py, torchao Float8Linear) against BF16 autocast: the same model,
    seed and random batches, torch.compile on for both (torchao's FP8 relies on it), `fp8_steps` steps; step time
    and the mean loss of the last 20 steps. Only on a GPU of compute capability >= 8.9 with torchao installed."""
    import torch

    from trainer.algorithms import fp8
    from trainer.model import build_model
    from trainer.objective import ObjectiveConfig, draw_noise, per_sample_loss

    try:
        fp8.check_device(torch.device(ctx.device))
        import torchao  # noqa: F401
    except (ValueError, ImportError) as exc:
        return [("fp8 vs bf16 training", "skipped", str(exc).splitlines()[0])]
    s, rows = ctx.shapes, []
    for use_fp8 in (False, True):
        torch.manual_seed(0)
        model = build_model(s.model, 16, s.text_dim).to(ctx.device).train()
        if use_fp8:
            fp8.convert(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-15, weight_decay=0.0)
        net, gen, losses = torch.compile(model), torch.Generator().manual_seed(0), []
        mask = torch.ones(s.batch, s.text_len, dtype=torch.bool, device=ctx.device)

        def step():
            x0 = torch.randn(s.batch, 16, s.latent, s.latent, generator=gen)
            eps, t = draw_noise(x0.shape, ObjectiveConfig(), gen)
            emb = torch.randn(s.batch, s.text_len, s.text_dim, generator=gen)
            loss = per_sample_loss(net, x0.to(ctx.device), eps.to(ctx.device), t.to(ctx.device),
                                   emb.to(ctx.device, torch.bfloat16), mask, ObjectiveConfig(), torch.bfloat16).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.2)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())

        sec = timed(ctx, step, s.fp8_steps)
        tail = torch.stack(losses[-20:]).float().mean().item()
        rows.append((f"train {s.model}, {'FP8 (torchao)' if use_fp8 else 'BF16 autocast'}",
                     f"{1000 * sec:.1f} ms/step", f"batch {s.batch}, {s.fp8_steps} steps, last-20 loss {tail:.4f}"))
        del model, opt, net
    return rows


def section_train_pixel(ctx: Ctx) -> list[tuple[str, str, str]]:
    """A pixel-space training step (`--vae none`): PRX's JiT model on 3-channel crops at `image` px,
    x-prediction with shift 3 (the jit-pixel overlay), BF16 autocast over FP32 weights, AdamW, compile off."""
    import torch

    from trainer.metrics import device_peak_flops
    from trainer.model import build_model, model_config, train_flops_per_sample
    from trainer.objective import ObjectiveConfig, draw_noise, per_sample_loss

    s, oc = ctx.shapes, ObjectiveConfig(prediction="x", shift=3.0)
    flops = train_flops_per_sample(model_config(s.pixel_model, 3, s.text_dim), s.image, s.image, s.text_len)
    peak = device_peak_flops(torch.device(ctx.device))
    model = build_model(s.pixel_model, 3, s.text_dim).to(ctx.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-15, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(s.batch, 3, s.image, s.image, generator=gen) * 2 - 1
    eps, t = draw_noise(x0.shape, oc, gen)
    emb = torch.randn(s.batch, s.text_len, s.text_dim, generator=gen).to(ctx.device, torch.bfloat16)
    mask = torch.ones(s.batch, s.text_len, dtype=torch.bool, device=ctx.device)
    x0, eps, t = x0.to(ctx.device), eps.to(ctx.device), t.to(ctx.device)
    dtype = torch.bfloat16 if ctx.device == "cuda" else None

    def step():
        per_sample_loss(model, x0, eps, t, emb, mask, oc, dtype).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.2)
        opt.step()
        opt.zero_grad(set_to_none=True)

    sps = s.batch / timed(ctx, step, s.steps)
    mfu = f"MFU {100 * flops * sps / peak:.1f}%" if peak else "MFU n/a (no peak for this device)"
    return [(f"train {s.pixel_model} (pixel space, x-prediction)", f"{sps:.1f} samples/s",
             f"batch {s.batch}, {s.image} px, BF16 autocast, compile off; {mfu} (img_in counted as one "
             "patch -> hidden projection, not through the bottleneck)")]


def _jpegs(n: int, small: bool) -> list[bytes]:
    """n distinct JPEGs (quality 90) of 512-1024 px a side (48-64 px with --dry-run): rescaled scikit-image photos."""
    import io

    import numpy as np
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(0)
    bases = [Image.fromarray(f()) for f in (skimage.data.astronaut, skimage.data.coffee, skimage.data.chelsea)]
    out = []
    for i in range(n):
        lo, hi = (48, 65) if small else (512, 1025)
        img = bases[i % len(bases)].resize((int(rng.integers(lo, hi)), int(rng.integers(lo, hi))))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def section_decode(ctx: Ctx) -> list[tuple[str, str, str]]:
    """`prx-data encode --decode cpu|gpu`'s per-image work: JPEG decode and the 256 px centre crop's LANCZOS
    resize, by Pillow in one CPU thread, and on the device (torchvision's batched nvJPEG decode, resize_box)."""
    import io

    import torch
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    from contract.encoders import buckets as bk
    from contract.images import decode_image
    from pipeline.device_decode import resize_box

    n, res = (4, 32) if ctx.dry_run else (256, 256)
    jpegs = _jpegs(n, ctx.dry_run)
    sizes = [Image.open(io.BytesIO(j)).size for j in jpegs]
    crops = [bk.plan_crop(w, h, res) for w, h in sizes]
    raw = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]

    def cpu():
        for j, c in zip(jpegs, crops):
            bk.crop_resize(decode_image(j)[0], c)

    def device():
        for img, c in zip(decode_jpeg(raw, mode=ImageReadMode.RGB, device=ctx.device), crops):
            resize_box(img, c.box, c.size)

    steps = 1 if ctx.dry_run else 3
    t_cpu, t_dev = timed(ctx, cpu, steps), timed(ctx, device, steps)
    what = f"{n} JPEGs of {'48-64' if ctx.dry_run else '512-1024'} px -> {res} px centre crop"
    return [("decode: Pillow, one CPU thread", f"{n / t_cpu:.0f} images/s", what),
            (f"decode: nvJPEG + resize_box on {ctx.device}", f"{n / t_dev:.0f} images/s",
             what + "; decode batched, float64 resize (exact Pillow two-pass)")]


SECTIONS: dict[str, Callable[[Ctx], list[tuple[str, str, str]]]] = {
    "train": section_train,
    "train-pixel": section_train_pixel,
    "encode": section_encode,
    "encode-spaces": section_encode_spaces,
    "decode": section_decode,
    "recaption": section_recaption,
    "sample": section_sample,
    "extractors": section_extractors,
    "fp8": section_fp8,
}


# ------------------------------------------------------------------------------------ report
def machine(device: str) -> dict[str, str]:
    import torch

    info = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
            "python": platform.python_version(), "torch": torch.__version__, "device": device}
    if device == "cuda":
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = str(torch.version.cuda)
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip()
        except OSError:
            info["driver"] = "unknown (no nvidia-smi)"
    else:
        info["device"] = f"CPU ({os.cpu_count()} cores)"
    return info


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [f"# bench/gpu.py{' --dry-run (tiny shapes: not a speed figure)' if doc['dry_run'] else ''}", "",
             "| " + " | ".join(m) + " |", "|" + "---|" * len(m), "| " + " | ".join(m.values()) + " |", "",
             "| section | what | figure | note |", "|---|---|---|---|"]
    for name, sec in doc["sections"].items():
        for what, figure, note in sec.get("rows", []):
            lines.append(f"| {name} | {what} | {figure} | {note} |")
        if sec.get("error"):
            lines.append(f"| {name} | failed | - | {sec['error']} |")
        lines.append(f"| {name} | wall time | {sec['seconds']:.1f} s | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-out/gpu", help="folder for gpu.json and gpu.md")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes and tiny models: checks every path")
    p.add_argument("--only", default="", help="comma-separated sections (default: all)")
    args = p.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device == "cpu" and not args.dry_run:
        p.error("no CUDA GPU here: run on a GPU, or --dry-run to check the script on the CPU")
    names = [n for n in args.only.split(",") if n] or list(SECTIONS)
    unknown = set(names) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {sorted(unknown)}; sections: {', '.join(SECTIONS)}")
    os.makedirs(args.out, exist_ok=True)
    ctx = Ctx(device, Shapes.dry() if args.dry_run else Shapes(), args.dry_run, os.path.join(args.out, "tiny-models"))
    doc = {"dry_run": args.dry_run, "machine": machine(device), "shapes": asdict(ctx.shapes), "sections": {}}
    failed = 0
    for name in names:
        t0 = time.perf_counter()
        try:
            doc["sections"][name] = {"rows": SECTIONS[name](ctx)}
        except Exception as exc:  # noqa: BLE001 - one section failing must not lose the others' figures
            failed += 1
            doc["sections"][name] = {"rows": [], "error": f"{type(exc).__name__}: {exc}"}
        doc["sections"][name]["seconds"] = round(time.perf_counter() - t0, 2)
        print(f"{name}: {doc['sections'][name]}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    with open(os.path.join(args.out, "gpu.json"), "w") as fh:
        json.dump(doc, fh, indent=2)
    with open(os.path.join(args.out, "gpu.md"), "w") as fh:
        fh.write(markdown(doc))
    print(markdown(doc))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
