"""FLUX.2's latent space end to end on the tiny models: `prx-data encode --vae <AutoencoderKLFlux2>` ->
prx-train (3 steps, the model built on the VAE's 32 channels) -> the sampler decodes through Flux2Pipeline's
inverse normalisation; prx-export refuses the run (no stock pipeline decodes it) and names prx-sample."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.cli import main as prx_data

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def flux2_run(tmp_path_factory, tiny_model):
    from conftest import latent_space_run

    return latent_space_run(tmp_path_factory.mktemp("flux2-data"), tiny_model("tiny-flux2-vae"),
                            tiny_model("tiny-t5gemma"))


def test_trains_samples_and_export_names_prx_sample(flux2_run):
    from contract.errors import PrxError
    from trainer.export import export
    from trainer.sample import Sampler, initial_noise, open_run

    out = flux2_run["run"]
    assert len(out["losses"]) == 3 and all(math.isfinite(v) for v in out["losses"]), out
    sampler = Sampler(open_run(out["run_dir"]))
    assert sampler.model.config.in_channels == 32 and sampler.vae.info["normalisation"] == "batch_norm_2x2"
    emb, mask = sampler.embed(["a photo of coffee"])
    u_emb, u_mask = sampler.pad([sampler.empty])
    latents = sampler.denoise(initial_noise((32, 4, 4), [0]), emb, mask, u_emb, u_mask, steps=2, cfg=3.5)
    image = sampler.vae.decode(latents)
    # the decode is Flux2Pipeline's: patchify, x * std + mean with the VAE's own batch-norm buffers, unpatchify
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline as P

    m = sampler.vae.model
    std = torch.sqrt(m.bn.running_var.view(1, -1, 1, 1) + m.config.batch_norm_eps)
    z = P._unpatchify_latents(P._patchify_latents(latents) * std + m.bn.running_mean.view(1, -1, 1, 1))
    with torch.no_grad():
        want = m.decode(z, return_dict=False)[0].clamp(-1, 1)
    torch.testing.assert_close(image, want, rtol=1e-5, atol=1e-5)
    target = flux2_run["root"] / "export"
    with pytest.raises(PrxError, match="prx-sample"):
        export(out["run_dir"], str(target))
    assert not target.exists()


def test_mixing_flux1_and_flux2_shards_is_refused(flux2_run, tiny_model):
    """Sources encoded in different latent spaces cannot be mixed: refused when the sources are opened."""
    from contract.encoded import EncoderMismatch
    from trainer.config import Mixture, Source
    from trainer.data import open_sources

    root = flux2_run["root"]
    assert prx_data(["encode", "--in", str(root / "raw"), "--out", str(root / "f1"), "--resolution", "32",
                     "--vae", tiny_model("tiny-flux-vae"), "--text-encoder", tiny_model("tiny-t5gemma"),
                     "--executor", "local", "--no-progress"]) == 0
    with pytest.raises(EncoderMismatch, match="different VAEs"):
        open_sources(Mixture([Source("f2", str(root / "enc"), 1.0), Source("f1", str(root / "f1"), 1.0)], {}))


def test_sampler_latents_equal_prx_pipeline_in_flux2_space(flux2_run):
    """FLUX.2's 32-channel space: PRXPipeline's final latents (the decode is the one checked above)."""
    from conftest import assert_sampler_equals_prx_pipeline

    from trainer.sample import Sampler, open_run

    assert_sampler_equals_prx_pipeline(Sampler(open_run(flux2_run["run"]["run_dir"])), (32, 4, 4), 32)
