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
