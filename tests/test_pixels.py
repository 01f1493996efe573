"""Pixel space's storage (contract/encoders/pixels.py): lossless bytes, the [-1, 1] mapping, the space's record."""
from __future__ import annotations

import numpy as np
import pytest

from contract.encoders import pixels as px


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)  # incompressible, odd aspect
    ramp = np.broadcast_to(np.arange(32, dtype=np.uint8)[None, :, None] * 8, (16, 32, 3)).copy()
    extremes = np.zeros((8, 8, 3), np.uint8)
    extremes[::2] = 255
    return [noise, ramp, extremes]


def test_stored_image_reads_back_byte_for_byte(images):
    for rgb in images:
        data = px.encode_image(rgb)
        assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
        assert np.array_equal(px.decode_image(data), rgb)


def test_read_pixels_maps_uint8_to_unit_range_and_back(images):
    from contract.encoders.vae import to_uint8

    rgb = images[0]
    x = px.read_pixels(px.encode_image(rgb))
    assert x.shape == (3, 24, 40) and str(x.dtype) == "torch.float32"
    # closed form: channel-first, 0 -> -1, 255 -> 1, v -> v / 127.5 - 1
    expected = rgb.transpose(2, 0, 1).astype(np.float64) / 127.5 - 1.0
    assert np.allclose(x.numpy(), expected, atol=1e-6)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    ext = px.read_pixels(px.encode_image(images[2]))
    assert float(ext.min()) == -1.0 and float(ext.max()) == 1.0
    # the sampler's uint8 conversion gives the stored bytes back
    assert np.array_equal(to_uint8(x[None])[0].numpy().transpose(1, 2, 0), rgb)


def test_pixel_space_record_and_name():
    info = px.pixel_info()
    assert (info["class"], info["latent_channels"], info["downsample"]) == ("none", 3, 1)
    assert (info["scaling_factor"], info["shift_factor"]) == (1.0, 0.0)
    assert px.is_pixel_space("none") and px.is_pixel_space("None") and not px.is_pixel_space("flux1")


def test_non_rgb_uint8_is_refused():
    with pytest.raises(ValueError, match="uint8 H x W x 3"):
        px.encode_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="uint8 H x W x 3"):
        px.encode_image(np.zeros((4, 4), np.uint8))


def test_a_model_that_does_not_fit_the_space_is_refused():
    """Channels must be the space's; every bucket's grid (size / downsample) must divide by the patch."""
    from diffusers.pipelines.prx.pipeline_prx import ASPECT_RATIO_256_BIN

    from contract.errors import PrxError
    from trainer.model import check_fits

    pixels = px.pixel_info()
    check_fits(3, 32, pixels, 256, "square")  # 256 = 8 x 32
    check_fits(16, 2, {"latent_channels": 16, "downsample": 8, "id": "flux1"}, 256, "square")  # 32 x 32 grid
    with pytest.raises(PrxError, match="takes 16 channels.*pixel space.*--model prx-jit-32-small"):
        check_fits(16, 2, pixels, 256, "square")
    with pytest.raises(PrxError, match="patch size 32 does not divide.*240x240"):
        check_fits(3, 32, pixels, 240, "square")
    # diffusers' 256 px bins are multiples of 32 a side (PRX's pixel patch fits them), not all of 64
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in ASPECT_RATIO_256_BIN.values())
    check_fits(3, 32, pixels, 256, "ar")
    misfit = [f"{h}x{w}" for h, w in ASPECT_RATIO_256_BIN.values() if h % 64 or w % 64]
    assert misfit
    with pytest.raises(PrxError, match=f"patch size 64 does not divide.*{misfit[0]}"):
        check_fits(3, 64, pixels, 256, "ar")
