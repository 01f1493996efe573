"""DC-AE's latent space end to end on the tiny models: `prx-data encode --vae <AutoencoderDC>` stores its
deterministic latent, prx-train trains on it as it is (3 steps), the sampler's final latents equal PRXPipeline's,
and prx-export writes a PRXPipeline with the AutoencoderDC that reloads with every tensor equal."""
from __future__ import annotations

import math
import os

import pytest
import torch

from pipeline.cli import main as prx_data

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dcae_run(tmp_path_factory, tiny_model):
    from conftest import write_photo_folder

    from trainer.config import TrainConfig
    from trainer.train import run

    root = tmp_path_factory.mktemp("dcae-data")
    photos = write_photo_folder(root / "photos")
    common = ["--executor", "local", "--no-progress"]
    te, vae = tiny_model("tiny-t5gemma"), tiny_model("tiny-dc-ae")
    assert prx_data(["ingest", "--in", str(photos), "--out", str(root / "raw"), "--source", "p", *common]) == 0
    assert prx_data(["encode", "--in", str(root / "raw"), "--out", str(root / "dc"), "--resolution", "32",
                     "--vae", vae, "--text-encoder", te, *common]) == 0
    cfg = TrainConfig(shards=[str(root / "dc")], model="tiny", steps=3, batch_size=2, lr=1e-3, warmup_steps=0,
                      out=str(root / "run"), log_every=1, checkpoint_every=1000, tensorboard=False, device="cpu",
                      vae=vae, text_encoder=te, loader_workers=0, shuffle_buffer=16, caption=dict(original=1.0))
    return {"run": run(cfg), "root": root, "vae": vae, "te": te}


def test_encode_stores_the_deterministic_latent_and_training_uses_it(dcae_run):
    from diffusers import AutoencoderDC

    from contract.encoded import encoded_info, read_latent
    from contract.shards import Sample, list_shards, read_shard

    info = encoded_info(str(dcae_run["root"] / "dc"))["vae"]
    assert info["class"] == "diffusers.AutoencoderDC" and info["posterior"] == "deterministic"
    assert info["downsample"] == 4 and info["latent_channels"] == 8 and info["scaling_factor"] == 0.41407
    sample = next(s for s in read_shard(list_shards(str(dcae_run["root"] / "dc"))[0]) if isinstance(s, Sample))
    mean, logvar = read_latent(sample)
    assert mean.shape == (8, 8, 8) and not logvar.any()
    vae = AutoencoderDC.from_pretrained(dcae_run["vae"])
    with torch.no_grad():  # decoding the stored latent gives an image of the crop's size
        assert vae.decode(mean[None]).sample.shape == (1, 3, 32, 32)
    assert len(dcae_run["run"]["losses"]) == 3 and all(math.isfinite(v) for v in dcae_run["run"]["losses"])


def test_sampler_latents_equal_prx_pipeline_with_dc_ae(dcae_run):
    from diffusers import FlowMatchEulerDiscreteScheduler, PRXPipeline

    from trainer.sample import Sampler, initial_noise, open_run, timestep_grid

    sampler = Sampler(open_run(dcae_run["run"]["run_dir"]))
    emb, mask = sampler.embed(["a photo of coffee"])
    u_emb, u_mask = sampler.pad([sampler.empty])
    noise = initial_noise((8, 8, 8), [3])
    ours = sampler.denoise(noise, emb, mask, u_emb, u_mask, steps=6, cfg=3.5)
    pipe = PRXPipeline(transformer=sampler.model, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                       text_encoder=sampler.text_encoder.model.encoder, tokenizer=sampler.text_encoder.tokenizer,
                       vae=sampler.vae.model, default_sample_size=32)
    theirs = pipe(prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt_embeds=u_emb,
                  negative_prompt_attention_mask=u_mask, latents=noise.clone(), guidance_scale=3.5,
                  timesteps=(timestep_grid(6, 1.0)[:-1] * 1000).tolist(), height=32, width=32, output_type="latent",
                  use_resolution_binning=False).images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    image = sampler.vae.decode(ours)  # PRXPipeline's decode: latents / scaling_factor, then the DC-AE decoder
    with torch.no_grad():
        want = sampler.vae.model.decode(ours / 0.41407, return_dict=False)[0].clamp(-1, 1)
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
