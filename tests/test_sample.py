"""prx-sample: the sampler against diffusers' PRXPipeline, batching, outputs and refusals; a memorisation check.

The session fixture `eval_runs` (conftest.py, shared with test_eval.py, test_export.py and test_caps.py) encodes
the bundled photos at 64 px with the tiny VAE and tiny T5Gemma through the real stages and trains two tiny runs
for a few steps."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import train_tiny
from pipeline.cli import main as prx_data


def _pipeline(sampler):
    from diffusers import FlowMatchEulerDiscreteScheduler, PRXPipeline

    return PRXPipeline(transformer=sampler.model, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                       text_encoder=sampler.text_encoder.model.encoder, tokenizer=sampler.text_encoder.tokenizer,
                       vae=sampler.vae.model, default_sample_size=64)


def test_sampler_latents_equal_prx_pipeline(eval_runs):
    """Same timesteps (shift 1), noise and embeddings: our Euler + CFG loop gives PRXPipeline's latents."""
    from trainer.sample import Sampler, initial_noise, open_run, timestep_grid

    sampler = Sampler(open_run(eval_runs["a"]))
    emb, mask = sampler.embed(["a photo of coffee"])
    u_emb, u_mask = sampler.pad([sampler.empty])
    noise = initial_noise((16, 8, 8), [3])
    ours = sampler.denoise(noise, emb, mask, u_emb, u_mask, steps=6, cfg=3.5)
    grid = timestep_grid(6, 1.0)
    theirs = _pipeline(sampler)(prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt_embeds=u_emb,
                                negative_prompt_attention_mask=u_mask, latents=noise.clone(), guidance_scale=3.5,
                                timesteps=(grid[:-1] * 1000).tolist(), height=64, width=64, output_type="latent",
                                use_resolution_binning=False).images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, sampler.denoise(noise, emb, mask, u_emb, u_mask, steps=6, cfg=1.0))


def test_batched_cfg_equals_per_prompt_sampling(eval_runs):
    """Many prompts in one CFG batch = each prompt alone; image i from seed + i whatever the batch size."""
    from trainer.sample import Sampler, open_run

    sampler = Sampler(open_run(eval_runs["a"]))
    prompts = ["a photo of coffee", "a photo of astronaut", "a rocket"]
    together = sampler.generate(prompts, [7, 8, 9], 64, 48, steps=3, cfg=3.5, batch_size=3)
    alone = torch.cat([sampler.generate([p], [s], 64, 48, steps=3, cfg=3.5) for p, s in zip(prompts, [7, 8, 9])])
    assert together.shape == (3, 3, 64, 48) and together.dtype == torch.uint8
    assert (together.int() - alone.int()).abs().max() <= 1
    assert not torch.equal(together[0], together[1])


def test_prx_sample_cli_writes_images_jsonl_grid(eval_runs, tmp_path):
    from PIL import Image

    from trainer.sample import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of coffee\n\na photo of chelsea, the cat\n")
    out = tmp_path / "out"
    assert main(["--run", eval_runs["a"], "--prompts", str(prompts), "--steps", "2", "--cfg", "2", "--seed", "5",
                 "--batch-size", "2", "--out", str(out), "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"]) for r in rows] == [("a photo of coffee", 5), ("a photo of chelsea, the cat", 6)]
    assert rows[0]["steps"] == 2 and rows[0]["cfg"] == 2.0 and rows[0]["weights"] == "raw" and rows[0]["step"] == 2
    assert Image.open(out / rows[1]["file"]).size == (64, 64)
    assert Image.open(out / "grid.png").size == (128, 64)
    assert (out / "sample_config.yaml").exists()


def test_prx_sample_refusals(eval_runs, tmp_path, capsys):
    from trainer.sample import main

    base = ["--prompt", "x", "--out", str(tmp_path / "o"), "--steps", "1", "--device", "cpu"]
    empty = tmp_path / "empty-run"
    empty.mkdir()
    cases = [(["--run", str(empty)], "no checkpoint"),
             (["--run", eval_runs["a"], "--cfg", "0.5"], "guidance must be >= 1"),
             (["--run", eval_runs["a"], "--height", "50"], "multiples of 16"),
             (["--run", eval_runs["a"], "--weights", "ema"], "--weights raw"),
             (["--run", eval_runs["a"], "--checkpoint", "7"], "checkpoints at steps 2")]
    for args, message in cases:
        assert main([*args, *base]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("prx-sample: error:") and message in err, (args, err)
    sprint = tmp_path / "sprint"
    import shutil

    shutil.copytree(eval_runs["a"], sprint)
    with open(sprint / "config.yaml", "a") as fh:
        fh.write("routing: sprint\n")
    assert main(["--run", str(sprint), *base]) == 2
    assert "sprint" in capsys.readouterr().err


def _wide_tiny_prx(folder) -> str:
    """The `tiny` preset at hidden 128 (4 heads of 32), saved as a model folder for `prx-train --model`."""
    from diffusers import PRXTransformer2DModel

    from trainer.model import PRESETS

    torch.manual_seed(0)
    cfg = dict(PRESETS["tiny"], hidden_size=128, num_heads=4, in_channels=16, context_in_dim=32)
    PRXTransformer2DModel(**cfg).save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


@pytest.mark.slow  # 300 training steps
def test_memorised_photos_come_back_at_their_captions(eval_runs, tiny_model, tmp_path):
    """A tiny denoiser trained until it memorises the 7 photos gives, at each caption, an image nearer (pixel MSE
    after decoding) to its own photo's decoded latent than to any other's: the sampler integrates the flow the
    trainer learnt (direction, timestep convention, scaling), not just runs.

    Why the set-up differs from `eval_runs`: the trainer draws x0 from the stored VAE posterior, and the random
    `tiny-flux-vae` has logvar ~ 0 (posterior std 1, three times the spread of its means), so every draw is mostly
    noise and nothing can be memorised. `tiny-flux-vae-sharp` is the same VAE (same means, same decoder) with a
    sharp posterior (logvar -20, as a trained VAE's is small) and scaling/shift that give the photos' latents mean
    0 and std 1 (what FLUX.1's factors do for its VAE; at FLUX.1's 0.3611 they have std 0.13 next to unit
    noise). The `tiny` preset (hidden 64) memorises slowly (500 steps for a 1.7x margin); hidden 128 does it in
    300 steps with a 4x margin. Training settings for fast memorisation: no caption dropout (sampled without
    guidance), uniform timesteps, lr 3e-3 without warmup, gradient clip 1. About 45 s of CPU time."""
    from contract.encoded import read_latent, scale_latent
    from contract.shards import list_shards, read_shard
    from trainer.sample import Sampler, open_run

    enc = str(tmp_path / "enc-sharp")
    assert prx_data(["encode", "--in", str(eval_runs["root"] / "raw"), "--out", enc, "--resolution", "64",
                     "--vae", tiny_model("tiny-flux-vae-sharp"), "--text-encoder", eval_runs["te"],
                     "--executor", "local", "--no-progress"]) == 0
    run = train_tiny(enc, tmp_path / "mem", model=_wide_tiny_prx(tmp_path / "prx-128"), steps=300, batch_size=7,
                 lr=3e-3, grad_clip=1.0, caption_dropout=0.0, uniform_fraction=1.0, log_every=100)
    sampler = Sampler(open_run(run))
    samples = sorted((s for sh in list_shards(enc) for s in read_shard(sh)), key=lambda s: s.key)
    assert len(samples) == 7 and all(read_latent(s)[1].max() < -10 for s in samples)  # the sharp posterior
    captions = [s.text("txt") for s in samples]
    ref = sampler.vae.decode(scale_latent(torch.stack([read_latent(s)[0] for s in samples]), sampler.vae.info))
    images = sampler.generate(captions, list(range(len(captions))), 64, 64, steps=30, cfg=1.0).float() / 127.5 - 1
    dist = (images[:, None] - ref[None]).pow(2).flatten(2).mean(2)
    own, others = dist.diag(), (dist + 1e9 * torch.eye(len(dist))).min(1).values
    assert dist.argmin(1).tolist() == list(range(len(captions))), dist
    assert (others > 2 * own).all(), dist  # seeds 0, 1, 2 gave at least 3.9x
