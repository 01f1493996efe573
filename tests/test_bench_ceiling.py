"""bench/ceiling.py: its null models have the real models' output widths, its captions pass the stage's word
bands, and its ceiling is the closed form it prints."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import ceiling

CONFIGS = Path(__file__).resolve().parent.parent / "bench" / "model-configs"


def test_null_models_have_the_real_output_widths():
    vae = json.loads((CONFIGS / "flux1-dev-vae.json").read_text())
    t5gemma = json.loads((CONFIGS / "t5gemma-2b-2b-ul2.json").read_text())
    clip = json.loads((CONFIGS / "clip-vit-large-patch14-336.json").read_text())
    assert ceiling.LATENT_CHANNELS == vae["latent_channels"] == 16
    assert 2 ** (len(vae["block_out_channels"]) - 1) == 8           # the null VAE's h/8 x w/8
    assert ceiling.TEXT_DIM == t5gemma["encoder"]["hidden_size"] == 2304
    assert ceiling.NullClip.dim == clip["projection_dim"] == 768


def test_null_captions_fall_in_the_variant_word_bands():
    from captioners.variants import spec

    long_words, short_words = len(ceiling.long_caption().split()), len(ceiling.SHORT.split())
    assert spec("long").min_words <= long_words <= spec("long").max_words and 155 <= long_words <= 175
    assert spec("short").min_words <= short_words <= spec("short").max_words


@pytest.mark.parametrize("k, expected", [(12, 250.0), (2, 200.0)])
def test_ceiling_is_the_slowest_of_gil_decode_threads_and_cores(k, expected):
    # 10 samples, 10 ms CPU each, 6 ms of it decode on 4 threads: GIL-held 4 ms -> 250/s at 12 cores;
    # at 2 cores the CPU bound (10 ms / 2 = 5 ms) wins -> 200/s.
    row = ceiling.Row("encode", n=10, wall=1.0, cpu=0.1, main=0.03, writer=0.01, side=0.0, decode=0.006, threads=4)
    assert row.rest() == pytest.approx(0.004)
    assert row.ceiling(k) == pytest.approx(expected)


@pytest.mark.parametrize("k, expected", [(12, 400.0), (2, 1000 / 6)])
def test_with_processes_the_worker_cpu_is_the_gil_bound_and_the_children_run_in_parallel(k, expected):
    # 10 samples: the worker 2 ms each (all of it counted as GIL-held), its 4 processes 10 ms each between them:
    # 10 / 4 = 2.5 ms at 12 cores -> 400/s; at 2 cores all CPU, 12 ms / 2 = 6 ms, wins.
    row = ceiling.Row("encode", n=10, wall=1.0, cpu=0.02, main=0.01, writer=0.0, side=0.1, decode=0.0, threads=4)
    assert row.rest() == pytest.approx(0.002)
    assert row.ceiling(k) == pytest.approx(expected)


def test_a_decode_alone_as_slow_as_the_whole_stage_leaves_the_gil_part_unresolved():
    row = ceiling.Row("filter", n=10, wall=1.0, cpu=0.1, main=0.02, writer=0.0, side=0.0, decode=0.012, threads=4)
    assert row.rest() is None
