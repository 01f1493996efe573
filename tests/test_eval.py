"""prx-eval: metric closed forms, the uint8 contract, tiny extractors end to end, the real-feature cache,
prx-eval compare, bad input."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer import scores


# ------------------------------------------------------------------------------------------- closed forms
def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    d1, d2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    assert math.isclose(scores.frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)), want, rel_tol=1e-10)
    assert scores.frechet_distance(mu1, np.diag(d1), mu1, np.diag(d1)) == pytest.approx(0, abs=1e-9)
    few = scores.fid_from_features(rng.normal(size=(4, 16)), rng.normal(size=(3, 16)))  # n < d: singular
    assert math.isfinite(few) and few >= 0


def test_mmd_closed_forms():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 8))
    assert scores.mmd(x, x) == pytest.approx(0, abs=1e-9)
    a, b = np.zeros((1, 3)), np.array([[3.0, 4.0, 0.0]])  # |a - b|^2 = 25
    assert scores.mmd(a, b) == pytest.approx(1000 * (2 - 2 * math.exp(-25 / 200)))
    assert scores.mmd(a, b, sigma=2.0, scale=1.0) == pytest.approx(2 - 2 * math.exp(-25 / 8))
    y = rng.normal(1.0, size=(30, 8))
    assert scores.mmd(x, y, chunk=7) == pytest.approx(scores.mmd(x, y, chunk=1024), rel=1e-12)
    k = lambda p, q: np.exp(-((p[:, None] - q[None]) ** 2).sum(-1) / 200)  # noqa: E731
    assert scores.mmd(x, y) == pytest.approx(1000 * (k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()))


def test_clip_score_and_fid_prx_wrap():
    img = np.array([[1.0, 0.0], [1.0, 0.0]])
    txt = np.array([[2.0, 0.0], [-1.0, 0.0]])  # cos 1 and -1 -> 100 and 0
    assert scores.clip_score(img, txt) == pytest.approx(50.0)
    v = torch.tensor([0, 1, 2, 128, 200, 255], dtype=torch.uint8)
    assert scores.fid_prx_transform(v).tolist() == [0, 255, 254, 128, 56, 1]
    with pytest.raises(TypeError):
        scores.fid_prx_transform(v.float())


def test_inception_adapter_gets_uint8_unchanged(tiny_model):
    import os

    from trainer.extractors import InceptionExtractor

    ex = InceptionExtractor(os.path.join(tiny_model("tiny-inception"), "inception.pth"))
    seen = []
    ex.model.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    img = torch.tensor([1, 2, 200], dtype=torch.uint8).repeat_interleave(4).view(1, 3, 2, 2)
    feats = ex(img)
    assert feats.shape == (1, 2048) and seen[0].dtype == torch.uint8 and torch.equal(seen[0], img)
    with pytest.raises(TypeError, match="uint8"):
        ex(img.float())


def test_inception_weights_that_need_unpickling_are_refused(tmp_path):
    from contract.errors import PrxError
    from trainer.extractors import load_inception_state

    bad = tmp_path / "bad.pth"
    torch.save({"w": torch.zeros(1), "extra": argparse.Namespace(a=1)}, bad)  # an arbitrary object: needs unpickling
    with pytest.raises(PrxError, match="weights_only"):
        load_inception_state(str(bad))


# ------------------------------------------------------------------------------------------- end to end
def _eval_args(runs, run, cache, tiny_model, *extra):
    import os

    return ["--run", run, "--real", runs["enc"], "--n", "3", "--steps", "2", "--real-cache", str(cache),
            "--clip-model", tiny_model("tiny-clip"), "--dino-model", tiny_model("tiny-dinov2"),
            "--inception-weights", os.path.join(tiny_model("tiny-inception"), "inception.pth"),
            "--device", "cpu", "--no-progress", *extra]


@pytest.mark.slow  # prx-eval end to end, twice, and compare
def test_prx_eval_end_to_end_cache_and_compare(eval_runs, tiny_model, tmp_path, capsys):
    from trainer.evaluate import main

    cache = tmp_path / "cache"
    assert main(_eval_args(eval_runs, eval_runs["a"], cache, tiny_model, "--cfg", "1,2")) == 0
    doc = json.loads((Path(eval_runs["a"]) / "eval" / "step-00000002" / "metrics.json").read_text())
    assert doc["n"] == 3 and doc["seeds"] == [42, 44] and [r["cfg"] for r in doc["results"]] == [1.0, 2.0]
    for r in doc["results"]:
        assert set(r["metrics"]) == {"fid", "cmmd", "dino_mmd", "clip_score"}
        assert all(math.isfinite(v) and v >= 0 for v in r["metrics"].values())
    assert not any(doc["real_features_cached"].values())
    assert doc["models"]["clip"]["key"].startswith("open_clip:local:tiny-clip@")
    # a second run (another model) reuses the cached real features
    assert main(_eval_args(eval_runs, eval_runs["b"], cache, tiny_model, "--metrics", "cmmd,dino_mmd",
                           "--cfg", "2")) == 0
    doc_b = json.loads((Path(eval_runs["b"]) / "eval" / "step-00000002" / "metrics.json").read_text())
    assert all(doc_b["real_features_cached"].values()) and doc_b["real_set_hash"] == doc["real_set_hash"]
    capsys.readouterr()
    from trainer.evaluate import main as eval_main

    out = tmp_path / "cmp"
    assert eval_main(["compare", eval_runs["a"], eval_runs["b"], "--baseline", eval_runs["a"], "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "FID" in printed and "CMMD" in printed and "run-a" in printed and "run-b" in printed
    cmp = json.loads((out / "compare.json").read_text())
    row_b = next(r for r in cmp["rows"] if r["run"] == "run-b")
    row_a = next(r for r in cmp["rows"] if r["run"] == "run-a" and r["cfg"] == 2.0)
    assert row_b["d_cmmd"] == pytest.approx(row_b["cmmd"] - row_a["cmmd"]) and row_a["d_cmmd"] == 0
    assert row_b["samples_seen"] == 2 * 4 and row_b["train_samples_per_s"] > 0
    assert (out / "compare.md").read_text().startswith("| run |")


def test_prx_eval_bad_input(eval_runs, tiny_model, tmp_path, capsys):
    from trainer.evaluate import main

    cache = tmp_path / "cache"
    base = _eval_args(eval_runs, eval_runs["a"], cache, tiny_model)
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(["--run", str(empty)], "no checkpoint"),
             (["--real", eval_runs["noimg"]], "--drop-images"),
             (["--caption", "long"], "caption_long.txt"),
             (["--n", "100"], "only 7 samples"),
             (["--metrics", "fid,is"], "unknown ['is']"),
             (["--cfg", "0.5"], "guidance must be >= 1"),
             (["--inception-weights", str(tmp_path / "none.pth")], "--inception-weights")]
    for args, message in cases:
        assert main([*base, *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("prx-eval: error:") and message in err, (args, err)
    i = base.index("--inception-weights")
    assert main(base[:i] + base[i + 2:]) == 2
    assert "--inception-weights FILE" in capsys.readouterr().err


def test_metrics_during_training_log_to_tensorboard(eval_runs, tiny_model, tmp_path):
    from contract.config import ConfigError
    from trainer.config import TrainConfig
    from trainer.evaluate import during_training

    class Board:
        def __init__(self):
            self.scalars = {}

        def add_scalar(self, tag, value, step):
            self.scalars[tag] = (value, step)

    tb = Board()
    values = during_training(eval_runs["a"], 2, eval_runs["enc"], 2, tb, clip_model=tiny_model("tiny-clip"),
                             dino_model=tiny_model("tiny-dinov2"), steps=1, real_cache=str(tmp_path), device="cpu")
    assert set(values) == {"cmmd", "dino_mmd", "clip_score"}
    assert tb.scalars["eval/cmmd"] == (values["cmmd"], 2) and "eval/dino_mmd" in tb.scalars
    with pytest.raises(ConfigError, match="multiple of --checkpoint-every"):
        TrainConfig(model="tiny", metrics_every=5, metrics_real="x", checkpoint_every=10)
