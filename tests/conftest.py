"""Shared fixtures: real photos, tiny models built once per session, and no network but loopback.

pytest-socket (configured in pyproject: --allow-hosts) refuses connections to anything but loopback;
the hub is also switched offline for any subprocess the tests start.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest

PHOTO_NAMES = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry"]  # skimage "cat" is chelsea


def photo_arrays() -> dict[str, np.ndarray]:
    """Real RGB photos bundled with scikit-image and scikit-learn."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    out = {}
    for name in PHOTO_NAMES:
        fn = getattr(skimage.data, name, None)
        if fn is None:
            continue
        arr = fn()
        if arr.ndim == 3 and arr.shape[2] == 3:
            out[name] = arr
    for name, arr in zip(["china", "flower"], load_sample_images().images):
        out[name] = arr
    return out


# Slow tests of modules that mark none themselves yet, by module and test name: a function name marks every
# parameter of a parametrized test, `name[id]` one. Once a module marks its own (`@pytest.mark.slow` above the
# test, or `pytest.param(..., marks=pytest.mark.slow)`), its entry goes.
SLOW_BY_NAME = {
    "tests/test_ablations.py": ["test_overlays_change_exactly_their_keys_and_each_runs_3_steps",
                                "test_killed_and_resumed_overlay_matches_uninterrupted"],
    "tests/test_algorithms.py": ["test_compile_compiles_the_denoiser_with_its_algorithms"],
    "tests/test_audit_runner.py": ["test_dask_equals_local_and_resume"],
    "tests/test_filter_plugin.py": ["test_new_filters_are_one_file_and_one_registry_line_each"],
    "tests/test_language.py": ["test_lingua_agrees_with_fasttext_on_the_labelled_set",
                               "test_audit_filter_and_recaption_agree[lingua]"],   # the first to load lingua
    "tests/test_loader.py": ["test_resume_with_only_the_run_folder", "test_data_error_on_one_rank_stops_both"],
    "tests/test_train.py": ["test_loss_on_fixed_eval_batch_drops", "test_killed_and_resumed_run_matches_uninterrupted",
                            "test_cli_overlay_config_tiny_prx_folder_and_outputs"],
}


@pytest.hookimpl(tryfirst=True)   # before `-m "not slow"` deselects
def pytest_collection_modifyitems(config, items):
    """Marks SLOW_BY_NAME's tests slow; a name its (collected) module does not define stops the run, so a renamed
    test cannot silently join `make test-fast`."""
    modules = {}
    for item in items:
        names = SLOW_BY_NAME.get(item.nodeid.split("::")[0])
        if names is None:
            continue
        modules[item.nodeid.split("::")[0]] = item.module
        if item.name in names or getattr(item, "originalname", item.name) in names:
            item.add_marker(pytest.mark.slow)
    missing = [f"{path}::{name}" for path, module in modules.items() for name in SLOW_BY_NAME[path]
               if not hasattr(module, name.split("[")[0])]
    if missing:
        raise pytest.UsageError(f"tests/conftest.py SLOW_BY_NAME names tests that do not exist: {missing}")


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    return photo_arrays()


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory):
    """Folder where tiny models are built (once per session, on first use, by `tiny_model`)."""
    return str(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def tiny_model(tiny_models_dir):
    """tiny_model("name") -> folder of the seeded tiny model (testing/tiny_models.py builds it)."""
    from testing.tiny_models import build

    def get(name: str) -> str:
        return build(tiny_models_dir, [name], seed=0)[name]

    return get


def write_photo_folder(folder, photos: dict[str, np.ndarray] | None = None):
    """`folder` made and filled with JPEG photos (quality 90) and their .txt captions ("a photo of NAME")."""
    from PIL import Image

    folder.mkdir()
    for name, arr in (photos if photos is not None else photo_arrays()).items():
        Image.fromarray(arr).save(folder / f"{name}.jpg", quality=90)
        (folder / f"{name}.txt").write_text(f"a photo of {name.replace('_', ' ')}")
    return folder


@pytest.fixture
def photo_folder(tmp_path, photos):
    """A folder of JPEG photos with .txt captions."""
    return write_photo_folder(tmp_path / "photos", photos)


def latent_space_run(root, vae: str, te: str) -> dict:
    """The bundled photos ingested into root/raw, encoded at 32 px with `vae` into root/enc, and a tiny run
    trained on them for 3 steps (root/run): the end-to-end set-up of each latent space's tests."""
    from pipeline.cli import main as prx_data
    from trainer.config import TrainConfig
    from trainer.train import run

    photos = write_photo_folder(root / "photos")
    common = ["--executor", "local", "--no-progress"]
    assert prx_data(["ingest", "--in", str(photos), "--out", str(root / "raw"), "--source", "p", *common]) == 0
    assert prx_data(["encode", "--in", str(root / "raw"), "--out", str(root / "enc"), "--resolution", "32",
                     "--vae", vae, "--text-encoder", te, *common]) == 0
    cfg = TrainConfig(shards=[str(root / "enc")], model="tiny", steps=3, batch_size=2, lr=1e-3, warmup_steps=0,
                      out=str(root / "run"), log_every=1, checkpoint_every=1000, tensorboard=False, device="cpu",
                      vae=vae, text_encoder=te, loader_workers=0, shuffle_buffer=16, caption=dict(original=1.0))
    return {"run": run(cfg), "root": root, "vae": vae, "te": te}


def assert_sampler_equals_prx_pipeline(sampler, latent_shape: tuple, size: int) -> None:
    """Same timesteps (shift 1), noise and embeddings: our Euler + CFG loop gives PRXPipeline's final latents
    (output_type latent) within 1e-5."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, PRXPipeline

    from trainer.sample import initial_noise, timestep_grid

    emb, mask = sampler.embed(["a photo of coffee"])
    u_emb, u_mask = sampler.pad([sampler.empty])
    noise = initial_noise(latent_shape, [3])
    ours = sampler.denoise(noise, emb, mask, u_emb, u_mask, steps=6, cfg=3.5)
    pipe = PRXPipeline(transformer=sampler.model, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                       text_encoder=sampler.text_encoder.model.encoder, tokenizer=sampler.text_encoder.tokenizer,
                       vae=sampler.vae.model, default_sample_size=size)
    theirs = pipe(prompt_embeds=emb, prompt_attention_mask=mask, negative_prompt_embeds=u_emb,
                  negative_prompt_attention_mask=u_mask, latents=noise.clone(), guidance_scale=3.5,
                  timesteps=(timestep_grid(6, 1.0)[:-1] * 1000).tolist(), height=size, width=size,
                  output_type="latent", use_resolution_binning=False).images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def train_tiny(shards, out, **kw):
    """A tiny PRX run trained on `shards` into `out` (2 steps on the alt-texts unless kw says otherwise)."""
    from trainer.config import TrainConfig
    from trainer.train import run

    # the shards hold only the alt-text (`original`); the baseline trains on `long` recaptions
    base = dict(shards=[shards], caption={"original": 1.0}, model="tiny", steps=2, batch_size=4, lr=1e-3,
                warmup_steps=0, out=str(out), log_every=1, checkpoint_every=1000, tensorboard=False, device="cpu",
                shuffle_buffer=16)   # 7 photos: a 2,048-sample buffer would read each ~300 times before step 1
    base.update(kw)
    run(TrainConfig(**base))
    return str(out)


@pytest.fixture(scope="session")
def eval_runs(tmp_path_factory, tiny_model):
    """The bundled photos ingested and encoded at 64 px (tiny VAE, tiny T5Gemma; `noimg` without images) and two
    tiny runs trained on them for 2 steps (seeds 0 and 1): built once, for prx-sample, prx-eval and prx-export."""
    from pipeline.cli import main as prx_data

    root = tmp_path_factory.mktemp("eval-data")
    photos = write_photo_folder(root / "photos")
    common = ["--executor", "local", "--no-progress"]
    enc = ["--vae", tiny_model("tiny-flux-vae"), "--text-encoder", tiny_model("tiny-t5gemma"), "--resolution", "64"]
    assert prx_data(["ingest", "--in", str(photos), "--out", str(root / "raw"), *common]) == 0
    assert prx_data(["encode", "--in", str(root / "raw"), "--out", str(root / "enc"), *enc, *common]) == 0
    assert prx_data(["encode", "--in", str(root / "raw"), "--out", str(root / "noimg"), "--drop-images",
                     *enc, *common]) == 0
    return {"root": root, "enc": str(root / "enc"), "noimg": str(root / "noimg"),
            "a": train_tiny(str(root / "enc"), root / "run-a"),
            "b": train_tiny(str(root / "enc"), root / "run-b", seed=1),
            "vae": tiny_model("tiny-flux-vae"), "te": tiny_model("tiny-t5gemma")}
