"""Pixel space end to end on the tiny models: `prx-data encode --vae none` -> prx-train (x-prediction)."""
from __future__ import annotations

import math

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


def test_trainer_reads_pixels_and_trains_x_prediction(pixel_shards, tmp_path):
    """The loader's x0 is the stored crop in [-1, 1] (3 channels, full resolution); 3 steps of x-prediction
    on it give finite losses and a 3-channel denoiser."""
    from trainer.config import Mixture, Source, TrainConfig
    from trainer.data import MixtureLoader, open_sources
    from trainer.train import run

    spec = open_sources(Mixture([Source("p", pixel_shards["folder"], 1.0)], {}))
    assert spec.latent_channels == 3
    batch = next(iter(MixtureLoader(spec, 2, seed=0)))
    assert tuple(batch.x0.shape) == (2, 3, 32, 32)
    assert float(batch.x0.min()) >= -1.0 and float(batch.x0.max()) <= 1.0
    # values are k / 127.5 - 1 for integers k: the stored bytes, not a VAE's floats
    k = (batch.x0 + 1) * 127.5
    assert torch.allclose(k, k.round(), atol=1e-4)
    cfg = TrainConfig(shards=[pixel_shards["folder"]], model="tiny-pixel", steps=3, batch_size=2, lr=1e-3,
                      warmup_steps=0, out=str(tmp_path / "run"), log_every=1, checkpoint_every=1000, tensorboard=False,
                      device="cpu", vae="none", text_encoder=pixel_shards["te"], loader_workers=0, shuffle_buffer=16,
                      prediction="x", caption=dict(original=1.0))
    out = run(cfg)
    assert all(math.isfinite(v) for v in out["losses"]), out


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
