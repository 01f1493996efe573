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
            "--device", "cpu", "--no-progress", "--caption", "original", *extra]


@pytest.mark.slow  # prx-eval end to end, twice, and compare
def test_prx_eval_end_to_end_cache_and_compare(eval_runs, tiny_model, tmp_path, capsys):
    from trainer.evaluate import main

    cache = tmp_path / "cache"
    assert main(_eval_args(eval_runs, eval_runs["a"], cache, tiny_model, "--cfg", "1,2", "--keep-features")) == 0
    doc = json.loads((Path(eval_runs["a"]) / "eval" / "step-00000002" / "metrics.json").read_text())
    from safetensors.numpy import load_file

    for r in doc["results"]:  # --keep-features: the Inception features FID was computed from, per cfg
        kept = load_file(str(Path(eval_runs["a"]) / "eval" / "step-00000002" / r["features"]))
        assert kept["real"].shape == kept["generated"].shape == (3, 2048)
        assert scores.fid_from_features(kept["real"], kept["generated"]) == pytest.approx(r["metrics"]["fid"])
    assert doc["n"] == 3 and doc["seeds"] == [42, 44] and [r["cfg"] for r in doc["results"]] == [1.0, 2.0]
    for r in doc["results"]:
        assert set(r["metrics"]) == {"fid", "cmmd", "dino_mmd", "clip_score"}
        assert all(math.isfinite(v) and v >= 0 for v in r["metrics"].values())
    assert not any(doc["real_features_cached"].values())
    assert doc["models"]["clip"]["key"].startswith("open_clip:local:tiny-clip@")
    assert doc["caption"] == "original" and doc["protocol"]["weights"] == doc["weights"]
    assert doc["clip_score_text"]["context_tokens"] == 77 and "truncates" in doc["clip_score_text"]["note"]
    printed = capsys.readouterr().out
    assert "prompts: the original caption" in printed and "truncates captions at 77 tokens" in printed
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
    capsys.readouterr()  # building the tiny models (first use in this process) writes progress bars
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
                             dino_model=tiny_model("tiny-dinov2"), steps=1, real_cache=str(tmp_path), device="cpu",
                             caption="original")
    assert set(values) == {"cmmd", "dino_mmd", "clip_score"}
    assert tb.scalars["eval/cmmd"] == (values["cmmd"], 2) and "eval/dino_mmd" in tb.scalars
    with pytest.raises(ConfigError, match="multiple of --checkpoint-every"):
        TrainConfig(model="tiny", metrics_every=5, metrics_real="x", checkpoint_every=10)


# ------------------------------------------------------------------------------------------- comparability
def _doc(step=2, weights="raw", seeds=(42, 44), clip="open_clip:a", cfg=3.5, cmmd=1.0):
    return {"step": step, "n": 3, "seeds": list(seeds), "steps": 2, "caption": "short", "real_set_hash": "h",
            "weights": weights, "models": {"clip": {"key": clip}},
            "results": [{"cfg": cfg, "metrics": {"cmmd": cmmd}}]}


@pytest.mark.parametrize("change", [dict(weights="ema"), dict(seeds=(0, 2)), dict(clip="open_clip:b")])
def test_metrics_json_never_merges_other_weights_seeds_or_extractors(tmp_path, change):
    from trainer.evaluate import write_metrics

    write_metrics(str(tmp_path), 2, _doc(cfg=1.0))
    write_metrics(str(tmp_path), 2, _doc(cfg=2.0))  # same protocol, another guidance scale: one file, both
    folder = tmp_path / "eval" / "step-00000002"
    assert [r["cfg"] for r in json.loads((folder / "metrics.json").read_text())["results"]] == [1.0, 2.0]
    write_metrics(str(tmp_path), 2, _doc(cfg=3.0, **change))
    now = json.loads((folder / "metrics.json").read_text())
    assert [r["cfg"] for r in now["results"]] == [3.0]
    kept = [p for p in folder.iterdir() if p.name.startswith("metrics-")]
    assert len(kept) == 1 and [r["cfg"] for r in json.loads(kept[0].read_text())["results"]] == [1.0, 2.0]


def test_compare_subtracts_only_evaluations_of_one_protocol(tmp_path):
    from trainer.evaluate import compare, table, write_metrics

    for name, doc in (("base", _doc(cmmd=1.0)), ("same", _doc(cmmd=1.5)), ("ema", _doc(weights="ema", cmmd=0.5))):
        write_metrics(str(tmp_path / name), 2, doc)
    out = compare([str(tmp_path / "same"), str(tmp_path / "ema")], baseline=str(tmp_path / "base"))
    rows = {r["run"]: r for r in out["rows"]}
    assert rows["same"]["d_cmmd"] == pytest.approx(0.5) and rows["same"]["protocol"] == "same"
    assert "d_cmmd" not in rows["ema"] and rows["ema"]["protocol"] == "differs: weights"
    text = table(out)
    assert "weights" in text and "differs: weights" in text


def test_fid_prx_images_are_truncated_as_prx_and_the_others_rounded():
    """PRX's callback: clamp(x * 255, 0, 255).to(uint8) on [0, 1] images truncates; diffusers' postprocess rounds.
    Pixel values chosen where they differ: 100.7 / 255 -> 100 truncated, 101 rounded."""
    import torch

    from trainer.evaluate import EvalConfig, RealSample, generate

    values = torch.tensor([100.7, 0.2, 254.6, 255.0]) / 255 * 2 - 1

    class Fixed:
        def generate_pixels(self, prompts, seeds, h, w, steps, cfg, batch_size):
            return values.view(1, 1, 2, 2).expand(len(prompts), 3, 2, 2).clone()

    real = [RealSample("k", "a caption", torch.zeros(3, 2, 2, dtype=torch.uint8), (2, 2))]
    rounded, truncated = generate(Fixed(), real, 1.0, EvalConfig(fid_prx=True, progress=False))
    assert rounded[0][0].flatten().tolist() == [101, 0, 255, 255]
    assert truncated[0][0].flatten().tolist() == [100, 0, 254, 255]
    assert generate(Fixed(), real, 1.0, EvalConfig(progress=False))[1] is None


def test_cmmd_clip_is_openais_with_quickgelu():
    """OpenAI's CLIP was trained with QuickGELU; open_clip builds GELU for plain names unless told."""
    import open_clip

    from trainer.extractors import open_clip_kwargs, resolve_open_clip

    arch, tag, _ = resolve_open_clip("clip-vit-l-14-336")  # CMMD's model, the prx-eval default
    assert tag == "openai" and open_clip.get_model_config(arch)["quick_gelu"] is True
    arch, tag, _ = resolve_open_clip("ViT-B-32:openai")  # any OpenAI-tagged name, built the way ClipExtractor does
    model = open_clip.create_model(arch, pretrained=None, **open_clip_kwargs(tag))
    acts = {type(m).__name__ for m in model.modules() if "GELU" in type(m).__name__}
    assert acts == {"QuickGELU"}


def test_eval_prompts_default_to_prxs_short_llm_caption():
    from trainer.evaluate import EvalConfig

    # PRX's eval_unsplash.yaml prompts with caption_llm_s: the short LLM caption, here the `short` variant
    assert EvalConfig().caption == "short"
