"""The filters as units: dedup search (exact against brute force, memory linear in N), keeper rule, checks,
language detection."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from filters import dedup as dd
from filters.base import View


def _pairs(gen) -> set[tuple[int, int]]:
    out = set()
    for a, b in gen:
        out |= {(min(i, j), max(i, j)) for i, j in zip(a.tolist(), b.tolist())}
    return out


def _closure(n, pairs):
    labels = dd.components(n, [(np.array([p[0] for p in pairs], dtype=np.int64),
                                np.array([p[1] for p in pairs], dtype=np.int64))] if pairs else [])
    return labels


@pytest.mark.parametrize("t", [0, 3, 6, 10])
def test_hamming_pairs_match_brute_force(t):
    rng = np.random.default_rng(t)
    h = rng.integers(0, 2**63, size=600, dtype=np.int64)
    for i in range(0, 120, 4):  # plant near copies at distance 0..t and t+1
        flips = rng.choice(64, size=int(rng.integers(0, t + 2)), replace=False)
        h[i + 1] = h[i] ^ np.int64(sum(1 << int(f) for f in flips) - (1 << 64 if 63 in flips else 0))
    h[200] = h[0]
    u = h.view(np.uint64)
    brute = {(i, j) for i in range(len(h)) for j in range(i + 1, len(h))
             if int(np.bitwise_count(u[i] ^ u[j])) <= t}
    found = _pairs(dd.hamming_pairs(h, t))
    # same connected components (identical hashes are chained, not all paired)
    assert (_closure(len(h), found) == _closure(len(h), brute)).all()
    assert all(int(np.bitwise_count(u[i] ^ u[j])) <= t for i, j in found)


def _embeddings(n, d=32, seed=0):
    rng = np.random.default_rng(seed)
    e = rng.normal(size=(n, d)).astype(np.float32)
    for i in range(0, n - 1, 50):
        e[i + 1] = e[i] + 0.03 * rng.normal(size=d)
    return e


def test_semantic_pairs_find_planted_duplicates():
    e = _embeddings(3000)
    found = _pairs(dd.semantic_pairs(e, 0.98))
    planted = {(i, i + 1) for i in range(0, 2999, 50)}
    assert found == planted


def _peak(fn) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def test_semantic_dedup_memory_grows_linearly():
    n = 3000
    small, large = _embeddings(n, seed=1), _embeddings(4 * n, seed=2)
    run = lambda e: lambda: _pairs(dd.semantic_pairs(e, 0.98))  # noqa: E731
    p1, p4 = _peak(run(small)), _peak(run(large))
    # N x N would grow 16x (and 4N x 4N float32 alone is 576 MB); linear grows <= 4x (+ slack for constants)
    assert p4 <= 5 * p1, (p1, p4)
    assert p4 < (4 * n) ** 2 * 4 / 20, (p1, p4)


def test_keeper_rule():
    labels = np.array([0, 0, 0, 3, 3, 5])
    pixels = np.array([100, 400, 400, 10, 10, 1])
    clip = np.array([0.9, 0.2, 0.3, 0.5, 0.5, 0.1])
    shard = np.array([0, 1, 2, 3, 1, 0])
    keys = ["a", "b", "c", "d", "e", "f"]
    # group 0: largest (400) twice -> higher CLIP wins (index 2); group 3: tie on size and CLIP -> lower shard (4)
    assert dd.keepers(labels, pixels, clip, shard, keys).tolist() == [2, 2, 2, 4, 4, 5]
    shard = np.array([0, 1, 2, 1, 1, 0])
    assert dd.keepers(labels, pixels, clip, shard, keys).tolist()[3:5] == [3, 3]  # then the lower key
    assert dd.keepers(labels, pixels, None, shard, keys).tolist()[:3] == [1, 1, 1]


def test_exact_pairs():
    a, b = dd.exact_pairs(["x", "y", "x", "", "", "x"])
    assert list(zip(a.tolist(), b.tolist())) == [(0, 2), (0, 5)]


def test_image_checks_units():
    from PIL import Image

    from filters import image_checks as ic

    assert ic.min_side(100, 50, 64).reason == "image_too_small"
    assert ic.min_side(100, 64, 64).passed
    assert ic.aspect_ratio(400, 100, 3).reason == "aspect_ratio_too_large"
    assert ic.pixels(10, 10, 200, None).reason == "too_few_pixels"
    assert ic.pixels(100, 100, None, 5000).reason == "too_many_pixels"
    assert ic.file_size(10, 100, None).reason == "file_too_small"
    assert ic.near_blank(Image.new("RGB", (80, 80), "white"), 2).reason == "near_blank"
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 80, 3), dtype=np.uint8))
    assert ic.near_blank(noise, 2).passed
    # as filters: off by default, judging a view
    view = View("k", {}, "", nbytes=10, width=100, height=50)
    assert not ic.MinSide().active() and ic.MinSide(min_side=64).active()
    assert ic.MinSide(min_side=64).judge(view).reason == "image_too_small"
    assert ic.FileSize(min_file_bytes=100).judge(view).reason == "file_too_small"
    assert ic.Pixels(max_pixels=6000).judge(view).passed


def test_text_checks_and_language():
    from filters import text_checks as tc
    from filters.language import detect_language, language_available

    assert language_available()
    assert detect_language("A red bicycle leaning against a brick wall in the afternoon sun.")[0] == "en"
    code, conf = detect_language("Ein rotes Fahrrad lehnt an einer Mauer in der Nachmittagssonne.")
    assert code == "de" and 0 < conf <= 1
    assert detect_language("") == (None, 0.0)
    assert detect_language("12345 !!! ...") == (None, 0.0)
    length = tc.CaptionLength(reject_empty_caption=True, min_caption_words=3)
    empty = length.judge(View("k", {}, "   "))
    assert empty.reason == "caption_empty" and empty.final   # the caption checks after it skip the sample
    assert "caption_too_short" in [j.reason for j in length.judge(View("k", {}, "red bike"))]
    assert not tc.CaptionLength().active() and not tc.Language().active()
    j = tc.Language(languages=["en"]).judge(View("k", {}, "A red bicycle leaning against a brick wall."))
    assert j.passed and j.facts == {"language": "en"}
    j = tc.Language(languages=["en"]).judge(View("k", {}, "Ein rotes Fahrrad lehnt an einer alten Mauer."))
    assert j.reason == "caption_language" and j.facts == {"language": "de"}


def test_head_errors(tmp_path):
    from filters import laion_heads as lh

    with pytest.raises(lh.HeadError, match="--aesthetic-weights"):
        lh.load_head(None, "aesthetic", "--aesthetic-weights", "--min-aesthetic")
    with pytest.raises(lh.HeadError, match="not found"):
        lh.load_head(str(tmp_path / "missing.safetensors"), "aesthetic", "--aesthetic-weights",
                     "--min-aesthetic")
