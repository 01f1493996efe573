"""prx-export: a tiny run exports to a folder PRXPipeline.from_pretrained loads with every tensor equal to the
run's; it generates at the asked size and embeds prompts as the shards stored them; refused runs say why."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch



@pytest.fixture(scope="module")
def exported(eval_runs, tmp_path_factory):
    from trainer.export import main

    out = tmp_path_factory.mktemp("export") / "pipe"
    assert main([eval_runs["a"], "--out", str(out)]) == 0
    return str(out)


def test_export_reloads_with_the_runs_tensors(eval_runs, exported):
    from diffusers import AutoencoderKL, PRXPipeline, PRXTransformer2DModel
    from transformers import T5GemmaEncoderModel

    pipe = PRXPipeline.from_pretrained(exported)
    index = json.loads(open(os.path.join(exported, "model_index.json")).read())
    assert index["text_encoder"] == ["prx", "T5GemmaEncoder"] and pipe.default_sample_size == 64
    assert pipe.tokenizer.model_max_length == 256 and pipe.scheduler.config.shift == 1.0
    ckpt = os.path.join(eval_runs["a"], "checkpoints", "step-00000002", "transformer")
    pairs = [(pipe.transformer, PRXTransformer2DModel.from_pretrained(ckpt)),
             (pipe.vae, AutoencoderKL.from_pretrained(eval_runs["vae"])),
             (pipe.text_encoder, T5GemmaEncoderModel.from_pretrained(eval_runs["te"]).encoder)]
    for got, want in pairs:
        g, w = got.state_dict(), want.state_dict()
        assert g.keys() == w.keys()
        for k in w:
            assert torch.equal(g[k], w[k]), k


def test_exported_pipeline_generates_and_embeds_like_the_shards(eval_runs, exported):
    from diffusers import PRXPipeline

    from contract.encoded import read_embedding
    from contract.shards import list_shards, read_shard

    pipe = PRXPipeline.from_pretrained(exported)
    # diffusers 0.42.1 raises for several prompts with guidance > 1: one prompt here (prx-sample batches many)
    image = pipe("a photo of coffee", guidance_scale=4.0, num_inference_steps=2, height=48, width=64,
                 use_resolution_binning=False).images[0]
    assert image.size == (64, 48)
    sample = next(s for sh in list_shards(eval_runs["enc"]) for s in read_shard(sh) if s.text("txt") == "a photo of coffee")
    stored = read_embedding(sample, "original").float()
    emb, mask, _, _ = pipe.encode_prompt("a photo of coffee", do_classifier_free_guidance=False)
    assert int(mask.sum()) == stored.shape[0]
    torch.testing.assert_close(emb[0][mask[0]].to(torch.bfloat16).float(), stored, atol=2e-2, rtol=2e-2)


def test_refused_exports(eval_runs, exported, tmp_path, capsys):
    from trainer.export import main

    x_run = tmp_path / "x-run"
    shutil.copytree(eval_runs["a"], x_run)
    cfg = (x_run / "config.yaml").read_text().replace("prediction: v", "prediction: x")
    (x_run / "config.yaml").write_text(cfg)
    none_run = tmp_path / "none-run"
    shutil.copytree(eval_runs["a"], none_run)
    data = json.loads((none_run / "data.json").read_text())
    data["text_encoder"]["cleaning"] = "none"
    (none_run / "data.json").write_text(json.dumps(data))
    cases = [([str(x_run), "--out", str(tmp_path / "o1")], "x-prediction"),
             ([str(none_run), "--out", str(tmp_path / "o2")], "--cleaning none"),
             ([eval_runs["a"], "--out", exported], "not empty"),
             ([eval_runs["a"], "--out", str(tmp_path / "o3"), "--weights", "ema"], "--weights raw")]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("prx-export: error:") and message in err, (args, err)
    assert os.listdir(exported)  # the refused export into it left it as it was


def test_a_run_whose_inference_needs_modules_outside_transformer(eval_runs, tmp_path, capsys):
    """SPRINT's fusion layer runs at inference and lives in aux.safetensors: prx-export refuses the run, naming the
    algorithm, before writing anything; prx-sample runs it with the fusion layer loaded (raw and EMA copies)."""
    from conftest import train_tiny
    from safetensors.torch import load_file

    from trainer.export import main as export_main
    from trainer.model import Denoiser
    from trainer.sample import Sampler, main as sample_main, open_run

    run = train_tiny(eval_runs["enc"], tmp_path / "sprint", routing="sprint", route_start=0, route_end=1,
                     ema_decay=0.5, ema_every=1)
    assert export_main([run, "--out", str(tmp_path / "out")]) != 0
    assert "trained with sprint" in capsys.readouterr().err and not os.path.exists(tmp_path / "out")
    aux = load_file(os.path.join(run, "checkpoints", "step-00000002", "aux.safetensors"))
    for weights, prefix in (("raw", ""), ("ema", "ema.")):
        model = Sampler(open_run(run, weights=weights)).model
        assert isinstance(model, Denoiser) and model.routing == "sprint" and not model.training
        for k, v in model.aux.state_dict().items():
            assert torch.equal(v, aux[prefix + k]), k
    assert not torch.equal(aux["sprint_fusion.linear.weight"], aux["ema.sprint_fusion.linear.weight"])
    assert sample_main(["--run", run, "--prompt", "a cat", "--steps", "2", "--out", str(tmp_path / "img")]) == 0
    assert any(f.endswith(".png") for f in os.listdir(tmp_path / "img"))


def test_listing_inference_modules_builds_only_the_algorithms_that_have_them():
    """A run's recorded config is read to find inference modules without building its other algorithms: an LPIPS
    run whose weights file has moved (its algorithm refuses to build without it) still samples."""
    from trainer.algorithms import needed_at_inference

    config = {"lpips_weight": 0.1, "lpips_weights": "/moved/lpips_vgg.pth", "prediction": "v", "routing": "sprint"}
    assert [a.name for a in needed_at_inference(config)] == ["sprint"]
    assert [a.name for a in needed_at_inference({"resolution_aware": "token"})] == ["resolution_aware"]
    assert needed_at_inference({"resolution_aware": "vec", "repa_weight": 0.5}) == []
