"""DC-AE's latent space end to end on the tiny models: `prx-data encode --vae <AutoencoderDC>` stores its
deterministic latent, prx-train trains on it as it is (3 steps), the sampler's final latents equal PRXPipeline's,
prx-export writes a PRXPipeline with the AutoencoderDC that reloads with every tensor equal, and a denoiser
trained to memorise 7 photos in this 32x space draws each at its caption."""
from __future__ import annotations

import math
import os

import pytest
import torch


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dcae_run(tmp_path_factory, tiny_model):
    from conftest import latent_space_run

    return latent_space_run(tmp_path_factory.mktemp("dcae-data"), tiny_model("tiny-dc-ae"), tiny_model("tiny-t5gemma"))


def test_encode_stores_the_deterministic_latent_and_training_uses_it(dcae_run):
    from diffusers import AutoencoderDC

    from contract.encoded import encoded_info, read_latent
    from contract.shards import Sample, list_shards, read_shard

    info = encoded_info(str(dcae_run["root"] / "enc"))["vae"]
    assert info["class"] == "diffusers.AutoencoderDC" and info["posterior"] == "deterministic"
    assert info["downsample"] == 4 and info["latent_channels"] == 8 and info["scaling_factor"] == 0.41407
    sample = next(s for s in read_shard(list_shards(str(dcae_run["root"] / "enc"))[0]) if isinstance(s, Sample))
    mean, logvar = read_latent(sample)
    assert mean.shape == (8, 8, 8) and not logvar.any()
    vae = AutoencoderDC.from_pretrained(dcae_run["vae"])
    with torch.no_grad():  # decoding the stored latent gives an image of the crop's size
        assert vae.decode(mean[None]).sample.shape == (1, 3, 32, 32)
    assert len(dcae_run["run"]["losses"]) == 3 and all(math.isfinite(v) for v in dcae_run["run"]["losses"])


def test_sampler_latents_equal_prx_pipeline_with_dc_ae(dcae_run):
    from conftest import assert_sampler_equals_prx_pipeline

    from trainer.sample import Sampler, initial_noise, open_run

    sampler = Sampler(open_run(dcae_run["run"]["run_dir"]))
    assert_sampler_equals_prx_pipeline(sampler, (8, 8, 8), 32)
    latents = initial_noise((8, 8, 8), [4])
    image = sampler.vae.decode(latents)  # PRXPipeline's decode: latents / scaling_factor, then the DC-AE decoder
    with torch.no_grad():
        want = sampler.vae.model.decode(latents / 0.41407, return_dict=False)[0].clamp(-1, 1)
    torch.testing.assert_close(image, want, rtol=1e-5, atol=1e-5)


def test_export_is_a_prx_pipeline_with_the_dc_ae_and_the_runs_tensors(dcae_run, tmp_path):
    from diffusers import AutoencoderDC, PRXPipeline, PRXTransformer2DModel

    from trainer.export import main

    out = tmp_path / "pipe"
    assert main([dcae_run["run"]["run_dir"], "--out", str(out)]) == 0
    pipe = PRXPipeline.from_pretrained(str(out))
    assert isinstance(pipe.vae, AutoencoderDC) and pipe.vae_scale_factor == 4
    ckpt = os.path.join(dcae_run["run"]["run_dir"], "checkpoints", "step-00000003", "transformer")
    for got, want in ((pipe.transformer, PRXTransformer2DModel.from_pretrained(ckpt)),
                      (pipe.vae, AutoencoderDC.from_pretrained(dcae_run["vae"]))):
        g, w = got.state_dict(), want.state_dict()
        assert g.keys() == w.keys() and all(torch.equal(g[k], w[k]) for k in w)
    image = pipe("a photo of coffee", guidance_scale=2.0, num_inference_steps=2, height=32, width=32,
                 use_resolution_binning=False).images[0]
    assert image.size == (32, 32)


def test_prx_small_on_dc_ae_shards_names_prxs_dcae_preset():
    from contract.errors import PrxError
    from trainer.model import check_preset_for_space

    with pytest.raises(PrxError, match="--model prx-dcae-small"):
        check_preset_for_space("prx-small", {"class": "diffusers.AutoencoderDC"})
    with pytest.raises(PrxError, match="--model prx-jit-32-small"):
        check_preset_for_space("prx-small", {"class": "none"})
    check_preset_for_space("prx-dcae-small", {"class": "diffusers.AutoencoderDC"})
    check_preset_for_space("prx-small", {"class": "diffusers.AutoencoderKL"})


def test_memorised_photos_come_back_at_their_captions_in_dc_ae_space(eval_runs, tiny_model, tmp_path):
    """The memorisation check of tests/test_sample.py in DC-AE's space (deterministic latents, no posterior
    draw): a denoiser trained until it memorises the 7 photos gives, at each caption, an image nearer to its own
    photo's decoded latent than to any other's."""
    from diffusers import PRXTransformer2DModel

    from conftest import train_tiny
    from contract.encoded import read_latent, scale_latent
    from contract.shards import list_shards, read_shard
    from pipeline.cli import main as prx_data
    from trainer.model import PRESETS
    from trainer.sample import Sampler, open_run

    enc = str(tmp_path / "enc")
    assert prx_data(["encode", "--in", str(eval_runs["root"] / "raw"), "--out", enc, "--resolution", "64",
                     "--vae", tiny_model("tiny-dc-ae"), "--text-encoder", eval_runs["te"],
                     "--executor", "local", "--no-progress"]) == 0
    torch.manual_seed(0)
    model = tmp_path / "prx-128"
    PRXTransformer2DModel(**dict(PRESETS["tiny"], hidden_size=128, num_heads=4, in_channels=8,
                                 context_in_dim=32)).save_pretrained(str(model), safe_serialization=True)
    run = train_tiny(enc, tmp_path / "mem", model=str(model), steps=300, batch_size=7, lr=3e-3, grad_clip=1.0,
                     caption_dropout=0.0, uniform_fraction=1.0, log_every=100)
    sampler = Sampler(open_run(run))
    samples = sorted((s for sh in list_shards(enc) for s in read_shard(sh)), key=lambda s: s.key)
    captions = [s.text("txt") for s in samples]
    ref = sampler.vae.decode(scale_latent(torch.stack([read_latent(s)[0] for s in samples]), sampler.vae.info))
    images = sampler.generate(captions, list(range(len(captions))), 64, 64, steps=30, cfg=1.0).float() / 127.5 - 1
    dist = (images[:, None] - ref[None]).pow(2).flatten(2).mean(2)
    own, others = dist.diag(), (dist + 1e9 * torch.eye(len(dist))).min(1).values
    assert dist.argmin(1).tolist() == list(range(len(captions))), dist  # each caption draws its own photo
    # a smaller margin than FLUX.1's test: DC-AE f32c32's scaling factor leaves the tiny VAE's latents well under
    # unit std, so the photos sit closer together in the denoiser's space (seed 0 gave 1.24x to 2.8x)
    assert (others > 1.2 * own).all(), dist
