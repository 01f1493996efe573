"""Fixtures and helpers of the vLLM tests (`make test-vllm`, in .venv-vllm): distinct photos ingested into
shards, the tiny Qwen2-VL built for vLLM, and `prx-data` run as a subprocess the way a user runs it. A module,
not a conftest.py: tests import `conftest` (tests/conftest.py) by name, and a second conftest would shadow it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
# vLLM's CPU KV cache for these tests (the default is 4 GiB; the tiny model needs a few MB)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# the tiny random model writes random words: only an empty caption fails
RELAXED = "relax_checks: [truncation, template, refusal, repetition, length, language]\n"


def distinct_photos(n: int) -> dict[str, np.ndarray]:
    """n different 256x192 crops of the bundled photos (ingest would drop exact duplicates)."""
    from PIL import Image

    from conftest import photo_arrays

    base = list(photo_arrays().items())
    out = {}
    for i in range(n):
        name, arr = base[i % len(base)]
        k = i // len(base)
        img = Image.fromarray(arr)
        w, h = img.size
        out[f"{name}_{i:03d}"] = np.asarray(img.crop((7 * k, 5 * k, w - 3 * k, h - 4 * k)).resize((256, 192)))
    return out


@pytest.fixture
def shards(tmp_path):
    """shards(n) -> a folder of n ingested photos (one shard)."""
    from conftest import write_photo_folder
    from pipeline.cli import main as prx_data

    def make(n: int) -> Path:
        folder = write_photo_folder(tmp_path / f"photos{n}", distinct_photos(n))
        out = tmp_path / f"raw{n}"
        assert prx_data(["ingest", "--in", str(folder), "--out", str(out), "--executor", "local",
                         "--no-progress"]) == 0
        return out

    return make


@pytest.fixture(scope="session")
def vllm_model(tiny_model) -> str:
    return tiny_model("tiny-qwen2-vl-vllm")


@pytest.fixture
def relaxed(tmp_path) -> Path:
    path = tmp_path / "relaxed.yaml"
    path.write_text(RELAXED)
    return path


def recaption_cmd(raw: Path, out: Path, model: str, config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "recaption", "--in", str(raw), "--out", str(out), "--backend",
            "vllm", "--model", model, "--config", str(config), "--no-progress", *extra]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """`cmd` in its own process group (so a test can kill it with its engine), output to `log`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def cache_files(out: Path) -> dict[str, bytes]:
    folder = out / ".cache" / "recaption"
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.jsonl"))} if folder.exists() \
        else {}


def cached_pairs(files: dict[str, bytes]) -> set[tuple[str, str]]:
    return {(r["key"], r["variant"]) for data in files.values() for r in map(json.loads, data.decode().splitlines())}
