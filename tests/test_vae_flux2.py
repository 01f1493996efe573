"""FLUX.2's VAE (AutoencoderKLFlux2): the denoiser's space is Flux2Pipeline's normalisation (2x2 patchify,
batch-norm running mean/std), recorded with the encoder and inverted exactly before decoding."""
import pytest
import torch

from contract.encoded import scale_latent, unscale_latent


@pytest.fixture(scope="module")
def flux2(tmp_path_factory):
    from contract.encoders.vae import load_vae
    from testing.tiny_models import build

    return load_vae(build(str(tmp_path_factory.mktemp("m")), ["tiny-flux2-vae"])["tiny-flux2-vae"])


def _reference_normalise(vae, z):
    """Flux2Pipeline._encode_vae_image's normalisation, on the model's own buffers, then unpatchified."""
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

    m = vae.model
    mean = m.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(m.bn.running_var.view(1, -1, 1, 1) + m.config.batch_norm_eps)
    return Flux2Pipeline._unpatchify_latents((Flux2Pipeline._patchify_latents(z) - mean) / std)


def test_record_names_the_latent_space(flux2):
    info = flux2.info
    assert (info["class"], info["latent_channels"], info["downsample"]) == ("diffusers.AutoencoderKLFlux2", 32, 8)
    assert info["normalisation"] == "batch_norm_2x2" and len(info["bn_mean"]) == len(info["bn_std"]) == 128


def test_normalisation_is_flux2_pipelines_and_inverts_exactly(flux2):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 32, 6, 4, generator=g)
    x = scale_latent(z, flux2.info)
    torch.testing.assert_close(x, _reference_normalise(flux2, z), rtol=1e-6, atol=1e-6)
    assert x.shape == z.shape  # PRX's prx_flux2 denoises the VAE's 32 channels on its own grid
    assert (unscale_latent(x, flux2.info) - z).abs().max() <= 1e-6
    assert (unscale_latent(x[0], flux2.info) - z[0]).abs().max() <= 1e-6  # a single sample (C x h x w) too


def test_decode_inverts_the_normalisation(flux2):
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    mean, _ = flux2.encode(pixels)
    with torch.no_grad():
        want = flux2.model.decode(mean, return_dict=False)[0].clamp(-1, 1)
    torch.testing.assert_close(flux2.decode(scale_latent(mean, flux2.info)), want, rtol=1e-5, atol=1e-5)
