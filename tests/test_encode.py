"""`prx-data encode` with the tiny models on real photos ingested by the ingest stage.

What must hold: stored mean/logvar equal a fresh vae.encode of the same crop; embeddings equal a fresh
encode of the same cleaned caption; BF16 round-trips bit-exactly; json.encoders names every encoder;
buckets match diffusers' bins; the reader refuses a folder whose encoder ids differ; malformed inputs
become ledger rows and the stage goes on.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from contract import encoded, ledger
from pipeline.cli import main
from contract.encoders import buckets as bk
from contract.shards import Problem, ShardWriter, read_shard
from pipeline.stage import PrxError

LONG = {"astronaut": "An ASTRONAUT in a white suit, see https://example.com/astro.jpg &amp; the flag",
        "coffee": "A cup of coffee (espresso) on a saucer -- seen from above",
        "chelsea": "A tabby cat named Chelsea looking up"}
SHORT = {"astronaut": "astronaut", "rocket": "a rocket"}
BAD_IMAGE_KEY = "f" * 32
BAD_JSON_KEY = "e" * 32
NO_CAPTION_KEY = "d" * 32


def _run(*args: str) -> int:
    return main([*args, "--executor", "local", "--no-progress"])


def _samples(folder: str) -> list:
    out = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".tar"):
            out += [s for s in read_shard(os.path.join(folder, name)) if not isinstance(s, Problem)]
    return out


def _ledger_rows(folder: str) -> dict[str, dict]:
    t = ledger.read_folder(folder).to_pylist()
    return {r["key"]: r for r in t}


@pytest.fixture(scope="module")
def models(tiny_model):
    return {"vae": tiny_model("tiny-flux-vae"), "text": tiny_model("tiny-t5gemma"), "dino": tiny_model("tiny-dinov2")}


@pytest.fixture(scope="module")
def captioned(tmp_path_factory, photos):
    """Raw shards from the ingest stage, then caption variants added to some samples (as recaption would),
    plus three malformed samples: a corrupt image, a bad json member, a sample without any caption."""
    base = tmp_path_factory.mktemp("encode-in")
    photo_dir = base / "photos"
    photo_dir.mkdir()
    for name, arr in photos.items():
        Image.fromarray(arr).save(photo_dir / f"{name}.jpg", quality=90)
        (photo_dir / f"{name}.txt").write_text(f"A photo of {name.replace('_', ' ')}.")
    raw = str(base / "raw")
    assert _run("ingest", "--in", str(photo_dir), "--out", raw, "--source", "test-photos") == 0
    out = str(base / "captioned")
    os.makedirs(out)
    writer = ShardWriter(out, 0, "recaption")
    good_jpg = None
    for s in _samples(raw):
        meta = s.meta()
        name = os.path.splitext(os.path.basename(meta["input_id"]))[0]
        members = dict(s.members)
        if name in LONG:
            members["caption_long.txt"] = LONG[name].encode()
        if name in SHORT:
            members["caption_short.txt"] = SHORT[name].encode()
        writer.write(s.key, members)
        writer.add_row(ledger.row(s.key, meta["input_id"]))
        good_jpg = good_jpg or s.members["jpg"]
    writer.write(BAD_IMAGE_KEY, {"jpg": good_jpg[: len(good_jpg) // 3], "txt": b"a broken photo",
                                 "json": json.dumps({"key": BAD_IMAGE_KEY, "input_id": "broken.jpg"}).encode()})
    writer.add_row(ledger.row(BAD_IMAGE_KEY, "broken.jpg"))
    writer.write(BAD_JSON_KEY, {"jpg": good_jpg, "txt": b"fine caption", "json": b"{not json"})
    writer.add_row(ledger.row(BAD_JSON_KEY, "badjson.jpg"))
    writer.write(NO_CAPTION_KEY, {"jpg": good_jpg, "txt": b"  ",
                                  "json": json.dumps({"key": NO_CAPTION_KEY, "input_id": "nocap.jpg"}).encode()})
    writer.add_row(ledger.row(NO_CAPTION_KEY, "nocap.jpg"))
    writer.close()
    return {"raw": raw, "captioned": out, "n_photos": len(photos), "base": base}


@pytest.fixture(scope="module")
def enc(captioned, models):
    out = str(captioned["base"] / "encoded")
    rc = _run("encode", "--in", captioned["captioned"], "--out", out, "--vae", models["vae"],
              "--text-encoder", models["text"], "--repa", models["dino"], "--variants", "original,long,short",
              "--batch-size", "64")
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def loaded(models):
    from contract.encoders.repa import load_teacher
    from contract.encoders.text import load_text_encoder
    from contract.encoders.vae import load_vae

    vae = load_vae(models["vae"])
    return vae, load_text_encoder(models["text"]), load_teacher(models["dino"], 2, vae.info["downsample"])


def _crop(sample, resolution=256, buckets="square"):
    img, _ = sample.image()
    crop = bk.plan_crop(img.width, img.height, resolution, buckets)
    return crop, bk.crop_resize(img, crop)


@pytest.fixture(scope="module")
def enc_b1(captioned, models):
    """The same input encoded one image / one caption per forward."""
    out = str(captioned["base"] / "encoded-b1")
    assert _run("encode", "--in", captioned["captioned"], "--out", out, "--vae", models["vae"],
                "--text-encoder", models["text"], "--variants", "original,long,short", "--batch-size", "1") == 0
    return out


def test_latents_equal_fresh_vae_encode(enc, enc_b1, loaded):
    vae = loaded[0]
    # one image per forward: stored mean/logvar are bit-identical to a fresh vae.encode of the same crop
    for s in _samples(enc_b1):
        m, lv = encoded.read_latent(s)
        fm, flv = vae.encode(bk.to_tensor([_crop(s)[1]]))
        assert m.dtype == torch.float32 and m.shape == (16, 32, 32)
        assert torch.equal(m, fm[0]) and torch.equal(lv, flv[0])
    # batched: the same batch through the bare model is bit-identical too
    samples = _samples(enc)
    crops = [_crop(s)[1] for s in samples]
    mean, logvar = vae.encode(bk.to_tensor(crops))
    for i, s in enumerate(samples):
        m, lv = encoded.read_latent(s)
        assert torch.equal(m, mean[i]) and torch.equal(lv, logvar[i])
    # and equal to a single-image encode up to float summation order (CPU kernels depend on the batch size)
    m1, lv1 = vae.encode(bk.to_tensor(crops[:1]))
    torch.testing.assert_close(m1[0], encoded.read_latent(samples[0])[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lv1[0], encoded.read_latent(samples[0])[1], rtol=1e-4, atol=1e-4)


def test_embeddings_equal_fresh_encode_of_cleaned_caption(enc, enc_b1, loaded):
    from diffusers.pipelines.prx.pipeline_prx import TextPreprocessor

    text = loaded[1]
    clean = TextPreprocessor().clean_text
    checked = 0
    # one caption per forward: bit-identical to a fresh encode of the same cleaned caption
    for s in _samples(enc_b1):
        for v in encoded.available_variants(s):
            fresh = text.encode([clean(s.text(encoded.caption_member(v)))])[0]
            assert torch.equal(encoded.read_embedding(s, v), fresh), (s.key, v)
    # batched (padded to the longest caption, masked): equal up to BF16 rounding of float reordering
    for s in _samples(enc):
        for v in encoded.available_variants(s):
            raw = s.text(encoded.caption_member(v))
            fresh = text.encode([clean(raw)])[0]
            stored = encoded.read_embedding(s, v)
            assert stored.dtype == torch.bfloat16 and stored.shape == fresh.shape
            torch.testing.assert_close(stored.float(), fresh.float(), rtol=1e-2, atol=1e-2)
            assert (stored != fresh).float().mean() < 0.02, (s.key, v)
            assert stored.shape[0] == s.meta()["encoders"]["captions"][v]["tokens"]
            assert stored.shape[0] == len(text.tokenizer(clean(raw))["input_ids"])
            checked += 1
    assert checked >= 6
    # the cleaning really ran (PRX's clean_text lowercases and strips URLs/HTML entities)
    assert clean(LONG["astronaut"]) != LONG["astronaut"] and "https" not in clean(LONG["astronaut"])


def test_bf16_round_trip_bit_exact(loaded):
    from safetensors.torch import load, save

    text = loaded[1]
    hidden = text.model(**text.tokenize(["a cat on a mat"])).last_hidden_state[0].detach()
    bf = hidden.to(torch.bfloat16)
    back = load(save({"hidden": bf}))["hidden"]
    assert back.dtype == torch.bfloat16
    assert torch.equal(back.view(torch.int16), bf.view(torch.int16))


def test_json_encoders_name_every_encoder(enc, models):
    info = encoded.encoded_info(enc)
    assert info["vae"]["id"] == os.path.abspath(models["vae"])
    assert info["vae"]["scaling_factor"] == pytest.approx(0.3611) and info["vae"]["shift_factor"] == pytest.approx(0.1159)
    assert info["vae"]["latent_channels"] == 16
    assert info["text_encoder"]["id"] == os.path.abspath(models["text"])
    assert info["text_encoder"]["max_length"] == 256 and info["text_encoder"]["cleaning"] == "prx"
    assert info["text_encoder"]["hidden_size"] == 32
    assert info["repa"]["id"] == os.path.abspath(models["dino"])
    assert info["variants"] == ["original", "long", "short"] and info["buckets"] == "square"
    for s in _samples(enc):
        e = s.meta()["encoders"]
        assert e["vae"]["id"] == info["vae"]["id"] and e["vae"]["revision"] == info["vae"]["revision"]
        assert e["vae"]["scaling_factor"] == info["vae"]["scaling_factor"]
        assert e["text_encoder"]["id"] == info["text_encoder"]["id"]
        assert e["text_encoder"]["max_length"] == 256 and e["text_encoder"]["cleaning"] == "prx"
        assert e["repa"]["id"] == info["repa"]["id"] and e["repa"]["grid"] == [16, 16]
        img, _ = s.image()
        assert e["latent"]["original_size"] == [img.width, img.height]
        l, t, r, b = e["latent"]["crop_box"]
        assert r - l == b - t == min(img.width, img.height)
        assert set(e["captions"]) == set(encoded.available_variants(s))


def test_repa_features_at_denoiser_grid(enc, loaded):
    teacher = loaded[2]
    samples = _samples(enc)
    feats = teacher.features(bk.to_tensor([_crop(s)[1] for s in samples]))
    for i, s in enumerate(samples):
        f = encoded.read_repa(s)
        assert f.shape == (16 * 16, 32) and f.dtype == torch.bfloat16
        assert torch.equal(f, feats[i])


def test_empty_prompt_once_per_folder(enc, loaded):
    text = loaded[1]
    assert os.path.isfile(os.path.join(enc, encoded.EMPTY_PROMPT_FILE))
    empty = encoded.load_empty_prompt(enc)
    assert empty.dtype == torch.bfloat16 and empty.ndim == 2
    assert torch.equal(empty, text.encode([text.clean("")])[0])
    assert not [n for n in os.listdir(enc) if n.startswith(".")]  # no temporary left behind


def test_variants_and_malformed_inputs_become_ledger_rows(enc, captioned):
    rows = _ledger_rows(enc)
    assert len(rows) == captioned["n_photos"] + 3
    assert rows[BAD_IMAGE_KEY]["outcome"] == "failed" and rows[BAD_IMAGE_KEY]["reason"] == "decode_error"
    assert rows[BAD_JSON_KEY]["outcome"] == "failed" and rows[BAD_JSON_KEY]["reason"] == "bad_member"
    assert rows[NO_CAPTION_KEY]["outcome"] == "rejected" and rows[NO_CAPTION_KEY]["reason"] == "no_caption_variant"
    samples = {s.key: s for s in _samples(enc)}
    assert len(samples) == captioned["n_photos"]  # every photo kept
    by_name = {os.path.splitext(os.path.basename(s.meta()["input_id"]))[0]: s for s in samples.values()}
    assert encoded.available_variants(by_name["astronaut"]) == ["long", "original", "short"]
    assert encoded.available_variants(by_name["coffee"]) == ["long", "original"]
    cat = by_name["chelsea"]
    assert encoded.read_embedding(cat, "short") is None
    assert rows[cat.key]["outcome"] == "kept" and "missing caption variant(s): short" in rows[cat.key]["detail"]
    assert cat.meta()["encoders"]["missing_variants"] == ["short"]
    assert rows[by_name["astronaut"].key]["detail"] == ""
    # the image bytes and other members are copied byte for byte
    raw = {s.key: s for s in _samples(captioned["captioned"])}
    for k, s in samples.items():
        assert s.members["jpg"] == raw[k].members["jpg"] and s.members["txt"] == raw[k].members["txt"]


def test_check_encoders_refuses_other_ids(enc, models):
    info = encoded.check_encoders(enc, vae=models["vae"], text_encoder=models["text"])
    assert info["resolution"] == 256
    with pytest.raises(encoded.EncoderMismatch) as err:
        encoded.check_encoders(enc, vae="flux1")
    msg = str(err.value)
    assert "black-forest-labs/FLUX.1-schnell" in msg or "flux1" in msg
    assert os.path.abspath(models["vae"]) in msg
    with pytest.raises(encoded.EncoderMismatch) as err:
        encoded.check_encoders(enc, text_encoder=models["dino"])
    assert os.path.abspath(models["text"]) in str(err.value) and models["dino"] in str(err.value)


def test_reader_refuses_folders_not_encoded(captioned, tmp_path):
    with pytest.raises(PrxError, match="prx-data encode"):
        encoded.encoded_info(captioned["raw"])
    with pytest.raises(PrxError, match="prx-data encode"):
        encoded.encoded_info(str(tmp_path))
    with pytest.raises(PrxError, match="prx-data encode"):
        encoded.check_encoders(captioned["captioned"], vae="flux1")


def test_reader_validates_members(enc):
    from safetensors.torch import save

    from contract.shards import BadMember, Sample

    s = _samples(enc)[0]
    bad = Sample(s.key, {**s.members, "latent.safetensors": save({"mean": torch.zeros(16, 4, 4, dtype=torch.float16),
                                                                   "logvar": torch.zeros(16, 4, 4)})})
    with pytest.raises(BadMember):
        encoded.read_latent(bad)
    bad = Sample(s.key, {**s.members, "emb_original.safetensors": b"garbage"})
    with pytest.raises(BadMember):
        encoded.read_embedding(bad, "original")


def test_ar_buckets_match_diffusers_bins(captioned, models, tmp_path):
    from diffusers.image_processor import PixArtImageProcessor
    from diffusers.pipelines.prx.pipeline_prx import ASPECT_RATIO_256_BIN, ASPECT_RATIO_512_BIN

    for (w, h) in [(640, 427), (427, 640), (512, 512), (1000, 300), (300, 1000), (800, 600)]:
        for res, bins in ((256, ASPECT_RATIO_256_BIN), (512, ASPECT_RATIO_512_BIN)):
            crop = bk.plan_crop(w, h, res, "ar")
            assert crop.size == PixArtImageProcessor.classify_height_width_bin(h, w, ratios=bins)
            assert list(crop.size) == bins[crop.bucket]
            l, t, r, b = crop.box
            assert abs((b - t) / (r - l) - crop.size[0] / crop.size[1]) < 0.02
    out = str(tmp_path / "enc-ar")
    assert _run("encode", "--in", captioned["captioned"], "--out", out, "--vae", models["vae"],
                "--text-encoder", models["text"], "--buckets", "ar", "--variants", "original", "--drop-images") == 0
    assert encoded.encoded_info(out)["buckets"] == "ar"
    seen = set()
    for s in _samples(out):
        assert "jpg" not in s.members  # --drop-images
        e = s.meta()["encoders"]["latent"]
        w, h = e["original_size"]
        size = PixArtImageProcessor.classify_height_width_bin(h, w, ratios=ASPECT_RATIO_256_BIN)
        assert tuple(e["size"]) == size and ASPECT_RATIO_256_BIN[e["bucket"]] == list(size)
        mean, _ = encoded.read_latent(s)
        assert tuple(mean.shape) == (16, size[0] // 8, size[1] // 8)
        seen.add(e["bucket"])
    assert len(seen) >= 2  # the photos are not all one shape


def test_rerun_is_byte_identical_and_resumes(enc, captioned, models, tmp_path):
    out = str(tmp_path / "again")
    args = ("encode", "--in", captioned["captioned"], "--out", out, "--vae", models["vae"], "--text-encoder",
            models["text"], "--repa", models["dino"], "--variants", "original,long,short", "--batch-size", "64")
    assert _run(*args) == 0
    for name in ("000000.tar", encoded.EMPTY_PROMPT_FILE):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(enc, name), "rb").read()
    before = os.stat(os.path.join(out, "000000.tar")).st_mtime_ns
    assert _run(*args) == 0  # same config: resumes, nothing redone
    assert os.stat(os.path.join(out, "000000.tar")).st_mtime_ns == before


def test_other_vae_class_refused(captioned, models, tmp_path, capsys):
    folder = tmp_path / "tiny-ae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny", "latent_channels": 4}))
    assert _run("encode", "--in", captioned["captioned"], "--out", str(tmp_path / "y"), "--vae", str(folder),
                "--text-encoder", models["text"]) == 2
    err = capsys.readouterr().err
    assert "AutoencoderTiny" in err and "AutoencoderKLFlux2" in err
    assert not (tmp_path / "y").exists() or not any((tmp_path / "y").glob("*.tar"))


def test_gated_text_encoder_says_how_to_get_access():
    from contract.encoders.text import text_info
    from contract.models import resolve

    with pytest.raises(PrxError, match="HF_TOKEN"):
        text_info(resolve("t5gemma-2b"), 256, "prx")


def test_bad_options_refused(captioned, models, tmp_path, capsys):
    base = ("encode", "--in", captioned["captioned"], "--vae", models["vae"], "--text-encoder", models["text"])
    assert _run(*base, "--out", str(tmp_path / "a"), "--buckets", "ar", "--resolution", "384") == 2
    assert "PRX bins" in capsys.readouterr().err
    assert _run(*base, "--out", str(tmp_path / "b"), "--resolution", "250") == 2
    assert _run(*base, "--out", str(tmp_path / "c"), "--variants", "../etc") == 2


@pytest.mark.slow  # a Dask cluster of worker processes
def test_dask_executor_matches_local(enc, captioned, models, tmp_path):
    """The default executor (a Dask LocalCluster, models loaded once per worker) writes the same samples.

    Not byte-identical: Dask workers run torch with another thread count, so float sums differ in the last bits."""
    out = str(tmp_path / "dask")
    assert main(["encode", "--in", captioned["captioned"], "--out", out, "--vae", models["vae"], "--text-encoder",
                 models["text"], "--repa", models["dino"], "--variants", "original,long,short", "--batch-size", "64",
                 "--executor", "dask", "--workers", "1", "--no-progress"]) == 0
    local = {s.key: s for s in _samples(enc)}
    dask = {s.key: s for s in _samples(out)}
    assert local.keys() == dask.keys()
    for k, s in dask.items():
        assert sorted(s.members) == sorted(local[k].members) and s.meta() == local[k].meta()
        for a, b in zip(encoded.read_latent(s), encoded.read_latent(local[k])):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        for v in encoded.available_variants(s):
            torch.testing.assert_close(encoded.read_embedding(s, v).float(),
                                       encoded.read_embedding(local[k], v).float(), rtol=1e-2, atol=1e-2)


def test_pixel_space_stores_the_crop_losslessly(captioned, models, tmp_path):
    """`--vae none`: no VAE; every kept sample holds its bucket crop as lossless WebP, byte-equal to the crop
    of the source image, and the folder's record names pixel space (3 channels, no compression)."""
    import numpy as np

    from contract.encoders import pixels as px

    out = str(tmp_path / "enc-pixels")
    assert _run("encode", "--in", captioned["captioned"], "--out", out, "--vae", "none",
                "--text-encoder", models["text"], "--buckets", "ar", "--variants", "original") == 0
    vae = encoded.encoded_info(out)["vae"]
    assert (vae["class"], vae["latent_channels"], vae["downsample"]) == ("none", 3, 1)
    source = {s.key: s for s in _samples(captioned["captioned"])}
    kept = _samples(out)
    assert len(kept) == captioned["n_photos"]
    for s in kept:
        assert "latent.safetensors" not in s.members
        crop, expected = _crop(source[s.key], buckets="ar")
        stored = px.decode_image(s.members["pixels.webp"])
        assert stored.shape == (*crop.size, 3) and np.array_equal(stored, expected)
        e = s.meta()["encoders"]
        assert e["latent"]["shape"] == [3, *crop.size] and e["vae"]["dtype"] == "uint8"
        x, none = encoded.read_image(s)  # what the trainer's loader trains on
        ref = torch.from_numpy(expected.astype("float32")).permute(2, 0, 1) / 127.5 - 1.0
        assert none is None and torch.equal(x, ref)
