"""Pixel space end to end on the tiny models: `prx-data encode --vae none` -> prx-train (x-prediction); a
pixel denoiser trained to memorise 7 photos draws each at its caption."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from pipeline.cli import main as prx_data

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pixel_shards(tmp_path_factory, tiny_model):
    from conftest import write_photo_folder

    root = tmp_path_factory.mktemp("pixel-data")
    photos = write_photo_folder(root / "photos")
    common = ["--executor", "local", "--no-progress"]
    te = tiny_model("tiny-t5gemma")
    assert prx_data(["ingest", "--in", str(photos), "--out", str(root / "raw"), "--source", "p", *common]) == 0
    assert prx_data(["encode", "--in", str(root / "raw"), "--out", str(root / "px"), "--resolution", "32",
                     "--vae", "none", "--text-encoder", te, *common]) == 0
    return {"folder": str(root / "px"), "te": te, "root": root}


@pytest.fixture(scope="module")
def pixel_run(pixel_shards, tmp_path_factory):
    """3 x-prediction steps of the tiny pixel model (patch 8, bottleneck 32) on the pixel shards."""
    from trainer.config import TrainConfig
    from trainer.train import run

    cfg = TrainConfig(shards=[pixel_shards["folder"]], model="tiny-pixel", steps=3, batch_size=2, lr=1e-3,
                      warmup_steps=0, out=str(tmp_path_factory.mktemp("pixel-run") / "run"), log_every=1,
                      checkpoint_every=1000, tensorboard=False, device="cpu", vae="none",
                      text_encoder=pixel_shards["te"], loader_workers=0, shuffle_buffer=16, prediction="x",
                      caption=dict(original=1.0))
    return run(cfg)


def test_trainer_reads_pixels_and_trains_x_prediction(pixel_shards, pixel_run):
    """The loader's x0 is the stored crop in [-1, 1] (3 channels, full resolution); 3 steps of x-prediction
    on it give finite losses and a 3-channel denoiser."""
    from trainer.config import Mixture, Source
    from trainer.data import MixtureLoader, open_sources

    spec = open_sources(Mixture([Source("p", pixel_shards["folder"], 1.0)], {}))
    assert spec.latent_channels == 3
    batch = next(iter(MixtureLoader(spec, 2, seed=0)))
    assert tuple(batch.x0.shape) == (2, 3, 32, 32)
    assert float(batch.x0.min()) >= -1.0 and float(batch.x0.max()) <= 1.0
    # values are k / 127.5 - 1 for integers k: the stored bytes, not a VAE's floats
    k = (batch.x0 + 1) * 127.5
    assert torch.allclose(k, k.round(), atol=1e-4)
    assert len(pixel_run["losses"]) == 3 and all(math.isfinite(v) for v in pixel_run["losses"]), pixel_run


def test_pixel_sampler_equals_prx_pixel_pipeline(pixel_run):
    """Same timesteps, noise and embeddings: our Euler + CFG loop on x-predictions gives PRXPixelPipeline's
    final pixels (its noise_scale set to the run's: the trainer draws unit noise, as PRX's JiT baseline)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, PRXPixelPipeline

    from trainer.sample import Sampler, initial_noise, open_run, timestep_grid

    sampler = Sampler(open_run(pixel_run["run_dir"]))
    emb, mask = sampler.embed(["a photo of coffee"])
    u_emb, u_mask = sampler.pad([sampler.empty])
    noise = initial_noise((3, 32, 32), [3])
    ours = sampler.denoise(noise, emb, mask, u_emb, u_mask, steps=6, cfg=3.5)
    pipe = PRXPixelPipeline(transformer=sampler.model, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                            text_encoder=sampler.text_encoder.model.encoder, tokenizer=sampler.text_encoder.tokenizer,
                            default_sample_size=32, noise_scale=1.0)
    theirs = pipe(prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt_embeds=u_emb,
                  negative_prompt_attention_mask=u_mask, latents=noise.clone(), guidance_scale=3.5,
                  timesteps=(timestep_grid(6, 1.0)[:-1] * 1000).tolist(), height=32, width=32, output_type="pt",
                  use_resolution_binning=False).images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # prx-sample's pixels: no decoder, the same image clamped to [-1, 1]
    pixels = sampler.generate_pixels(["a photo of coffee"], [3], 32, 32, steps=6, cfg=3.5)
    torch.testing.assert_close(pixels, theirs.clamp(-1, 1), atol=1e-5, rtol=1e-5)


def test_prx_sample_cli_draws_pixel_images(pixel_run, tmp_path):
    from PIL import Image

    from trainer.sample import main

    out = tmp_path / "out"
    assert main(["--run", pixel_run["run_dir"], "--prompt", "a photo of coffee", "--steps", "2", "--height", "48",
                 "--width", "32", "--out", str(out), "--device", "cpu"]) == 0
    row = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert Image.open(out / row["file"]).size == (32, 48)


def test_a_model_whose_patch_does_not_fit_the_pixels_is_refused_before_step_1(pixel_shards, tmp_path):
    from diffusers import PRXTransformer2DModel

    from contract.errors import PrxError
    from trainer.config import TrainConfig
    from trainer.model import PRESETS
    from trainer.train import run

    folder = tmp_path / "patch64"
    PRXTransformer2DModel(**dict(PRESETS["tiny"], patch_size=64, in_channels=3, context_in_dim=32)).save_pretrained(
        folder)
    cfg = TrainConfig(shards=[pixel_shards["folder"]], model=str(folder), steps=3, batch_size=2,
                      out=str(tmp_path / "run"), tensorboard=False, device="cpu", vae="none",
                      text_encoder=pixel_shards["te"], loader_workers=0, caption=dict(original=1.0))
    with pytest.raises(PrxError, match=r"patch size 64 does not divide the pixel space \(--vae none\) grid "
                                       r"of bucket\(s\) 32x32"):
        run(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_export_loads_in_prx_pixel_pipeline_with_the_runs_tensors(pixel_shards, pixel_run, tmp_path):
    """prx-export of a pixel run: PRXPixelPipeline.from_pretrained loads it with every tensor equal to the
    run's, noise_scale 1.0 (the trainer's unit noise), and it draws the asked size."""
    from diffusers import PRXPixelPipeline, PRXTransformer2DModel
    from transformers import T5GemmaEncoderModel

    from trainer.export import main

    out = tmp_path / "pipe"
    assert main([pixel_run["run_dir"], "--out", str(out)]) == 0
    pipe = PRXPixelPipeline.from_pretrained(str(out))
    assert pipe.config.noise_scale == 1.0 and pipe.config.default_sample_size == 32
    ckpt = os.path.join(pixel_run["run_dir"], "checkpoints", "step-00000003", "transformer")
    pairs = [(pipe.transformer, PRXTransformer2DModel.from_pretrained(ckpt)),
             (pipe.text_encoder, T5GemmaEncoderModel.from_pretrained(pixel_shards["te"]).encoder)]
    for got, want in pairs:
        g, w = got.state_dict(), want.state_dict()
        assert g.keys() == w.keys()
        for k in w:
            assert torch.equal(g[k], w[k]), k
    image = pipe("a photo of coffee", guidance_scale=4.0, num_inference_steps=2, height=48, width=32,
                 use_resolution_binning=False).images[0]
    assert image.size == (32, 48)


def _wide_tiny_pixel(folder) -> str:
    """`tiny-pixel` (patch 8, bottleneck 32) at hidden 128: memorises the photos in a few hundred steps."""
    from diffusers import PRXTransformer2DModel

    from trainer.model import PRESETS

    torch.manual_seed(0)
    PRXTransformer2DModel(**dict(PRESETS["tiny-pixel"], hidden_size=128, num_heads=4, in_channels=3,
                                 context_in_dim=32)).save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


def test_memorised_photos_come_back_at_their_captions_in_pixel_space(pixel_shards, tmp_path):
    """The memorisation check of tests/test_sample.py with no VAE in the way: a pixel denoiser trained with
    x-prediction until it memorises the 7 photos (32 px crops, distinct captions) draws, at each caption, an image
    nearer (pixel MSE) to its own stored crop than to any other's by 2x: the sampler integrates the x-prediction
    flow the trainer learnt. Settings as the DC-AE test (no caption dropout, sampled without guidance; uniform
    timesteps; lr 3e-3 without warmup; gradient clip 1), and x_pred_t_min 0.3: at the default 0.05 the v-space
    loss of t < 0.3 weighs up to 400x (1 / t^2) and, clipped to norm 1, leaves the noisy steps where the caption
    picks the photo too little of each update (300 steps gave 1.2x, or a swapped photo). The sampler converts
    with the run's t_min, so it integrates the trained flow. Seeds 0, 1, 2 gave at least 2.3x; 1 or 50 steps
    draw photo 2 for (nearly) every caption and fail. About 35 s of CPU time."""
    from conftest import train_tiny
    from contract.encoded import read_image
    from contract.shards import list_shards, read_shard
    from trainer.sample import Sampler, open_run

    run = train_tiny(pixel_shards["folder"], tmp_path / "mem", model=_wide_tiny_pixel(tmp_path / "px-128"),
                     steps=300, batch_size=7, lr=3e-3, grad_clip=1.0, caption_dropout=0.0, uniform_fraction=1.0,
                     x_pred_t_min=0.3, log_every=100, prediction="x", vae="none", text_encoder=pixel_shards["te"],
                     loader_workers=0)
    sampler = Sampler(open_run(run))
    samples = sorted((s for sh in list_shards(pixel_shards["folder"]) for s in read_shard(sh)), key=lambda s: s.key)
    captions = [s.text("txt") for s in samples]
    assert len(samples) == 7 and len(set(captions)) == 7 and sampler.x_pred_t_min == 0.3
    ref = torch.stack([read_image(s)[0] for s in samples])  # the stored crops in [-1, 1]
    images = sampler.generate(captions, list(range(len(captions))), 32, 32, steps=30, cfg=1.0).float() / 127.5 - 1
    dist = (images[:, None] - ref[None]).pow(2).flatten(2).mean(2)
    own, others = dist.diag(), (dist + 1e9 * torch.eye(len(dist))).min(1).values
    assert dist.argmin(1).tolist() == list(range(len(captions))), dist  # each caption draws its own photo
    assert (others > 2 * own).all(), dist
