"""Qwen3-VL and Qwen3 text towers: encode with the tiny Qwen3-VL tower, train 3 steps, prx-sample; the sampler's
prompt embeddings equal the stored ones; shards of different towers are not mixed; prx-export refuses naming
prx-sample. Each alias gets PRX's cleaning for it unless --cleaning says otherwise; BF16 encoding is autocast over
float32 weights, not PRX's BF16 weights (contract/encoders/text.py says why)."""
from __future__ import annotations

import pytest
import torch

from conftest import train_tiny, write_photo_folder
from pipeline.cli import main as prx_data


@pytest.mark.slow
def test_qwen3vl_tower_language_model_and_prx_tokens(tiny_model):
    """PRX's text tower keeps Qwen3VLForConditionalGeneration's `model.language_model` and its last hidden state
    over the caption's own tokens (no template): the same numbers as the full model's language model run by hand."""
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    from contract.encoders.text import load_text_encoder

    folder = tiny_model("tiny-qwen3-vl")
    te = load_text_encoder(folder, max_length=8, cleaning="basic")
    assert type(te.model).__name__ == "Qwen3VLTextModel" and te.info["hidden_size"] == 32
    caption = "A photograph of a tabby cat sitting on a wooden table near a bright window."
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok([caption], padding="max_length", max_length=8, truncation=True, return_tensors="pt")
    assert ids["attention_mask"].sum() == 8  # truncated at max_length, as PRX's tokenisation
    full = Qwen3VLForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        want = full.model.language_model(input_ids=ids["input_ids"]).last_hidden_state[0]
    got = te.encode([caption])[0]
    assert got.shape == (8, 32)
    torch.testing.assert_close(got.float(), want.to(torch.bfloat16).float(), atol=0, rtol=0)


@pytest.mark.slow
def test_qwen3vl_encode_train_sample_and_mixing(tiny_model, tmp_path):
    from contract.encoded import EncoderMismatch, read_embedding
    from contract.shards import list_shards, read_shard
    from trainer.config import TrainConfig, load_mixture
    from trainer.data import open_sources
    from trainer.export import main as prx_export
    from trainer.sample import Sampler, main as prx_sample, open_run

    photos = write_photo_folder(tmp_path / "photos")
    common = ["--executor", "local", "--no-progress"]
    assert prx_data(["ingest", "--in", str(photos), "--out", str(tmp_path / "raw"), *common]) == 0
    enc = {}
    for name in ("tiny-qwen3-vl", "tiny-qwen3"):
        enc[name] = str(tmp_path / name)
        assert prx_data(["encode", "--in", str(tmp_path / "raw"), "--out", enc[name], "--resolution", "64",
                         "--vae", tiny_model("tiny-flux-vae"), "--text-encoder", tiny_model(name),
                         "--cleaning", "basic", *common]) == 0
    run = train_tiny(enc["tiny-qwen3-vl"], tmp_path / "run", steps=3)
    sampler = Sampler(open_run(run))
    samples = [s for sh in list_shards(enc["tiny-qwen3-vl"]) for s in read_shard(sh)]
    captions = [s.text("txt") for s in samples]
    emb, mask = sampler.embed(captions)
    for i, s in enumerate(samples):
        stored = read_embedding(s, "original")
        n = stored.shape[0]
        assert int(mask[i].sum()) == n
        torch.testing.assert_close(emb[i][mask[i]], stored.float(), atol=0, rtol=0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of coffee\n")
    assert prx_sample(["--run", run, "--prompts", str(prompts), "--steps", "2", "--out", str(tmp_path / "out"),
                       "--device", "cpu"]) == 0
    assert list((tmp_path / "out").rglob("*.png"))
    mix = tmp_path / "mix.yaml"   # same width (32), different towers
    mix.write_text(f"sources:\n  a: {{shards: {enc['tiny-qwen3-vl']}}}\n  b: {{shards: {enc['tiny-qwen3']}}}\n")
    with pytest.raises(EncoderMismatch, match="different text encoders"):
        open_sources(load_mixture(TrainConfig(model="tiny", mix=str(mix))))
    assert prx_export([run, "--out", str(tmp_path / "pipe")]) == 2
    assert not (tmp_path / "pipe").exists()


def test_each_alias_is_encoded_with_prxs_cleaning_unless_asked_otherwise(monkeypatch):
    """PRX's qwen3vl_2b_256_bf16.yaml sets skip_text_cleaning: true (basic_clean), qwen3vl_8b's false (clean_text):
    manifests/models.yaml's `cleaning` gives `prx-data encode` that default; an explicit --cleaning wins; models
    without the field (aliases, hub ids, folders) get prx; a bad manifest value is refused naming the alias."""
    from contract.config import build_config
    from contract.encoders import text
    from contract.errors import PrxError
    from pipeline.stages.encode import EncodeConfig

    assert [text.default_cleaning(n) for n in ("qwen3vl-2b", "qwen3vl-8b", "t5gemma-2b", "org/model", "/x")] == \
        ["basic", "prx", "prx", "prx", "prx"]
    assert build_config(EncodeConfig, {"text_encoder": "qwen3vl-2b"}).cleaning == "basic"
    assert build_config(EncodeConfig, {"text_encoder": "qwen3vl-2b", "cleaning": "prx"}).cleaning == "prx"
    assert build_config(EncodeConfig, {}).cleaning == "prx"  # t5gemma-2b
    monkeypatch.setattr(text, "aliases", lambda: {"odd": {"id": "org/odd", "cleaning": "full"}})
    with pytest.raises(PrxError, match="manifests/models.yaml: odd's cleaning 'full' is not one of prx, basic, none"):
        EncodeConfig(text_encoder="odd")


def test_bf16_encoding_is_autocast_over_float32_weights_near_prxs_bf16_tower(tiny_model):
    """PRX runs the Qwen3-VL language model with BF16 weights and autocast off; here float32 weights under BF16
    autocast: both store BF16, ours is nearer the float32 forward and within BF16 noise of PRX's."""
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    from contract.encoders.text import load_text_encoder

    folder = tiny_model("tiny-qwen3-vl")
    te = load_text_encoder(folder, max_length=64, bf16=True)
    assert te.info["cleaning"] == "prx" and {p.dtype for p in te.model.parameters()} == {torch.float32}
    caption = "A photograph of a tabby cat sitting on a wooden table near a bright window."
    ids = AutoTokenizer.from_pretrained(folder)([caption], return_tensors="pt")
    prx_lm = Qwen3VLForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16).model.language_model
    with torch.no_grad():
        prx = prx_lm(**ids).last_hidden_state[0].float()
        fp32 = te.model(**ids).last_hidden_state[0]
    ours = te.encode([caption])[0]
    assert ours.dtype == torch.bfloat16 and ours.shape == prx.shape
    err = lambda x: float((x.float() - fp32).norm() / fp32.norm())  # noqa: E731
    assert err(ours) < err(prx) < 1e-2 and not torch.equal(ours.float(), prx)
