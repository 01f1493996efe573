"""`prx-data filter` on real photos with the tiny open_clip model: dedup across shards with the documented keeper,
exact --keep-top / --min-clip-score sets on crafted scores, a reason on every rejection, stored-score reuse."""
from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from contract import ledger
from pipeline.cli import main
from contract.shards import ShardWriter, dumps_json, list_shards, read_shard, shard_index

COMMON = ["--executor", "local", "--no-progress"]


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def raw(tmp_path_factory, photos):
    """Ingested shards: shard 0 holds the originals, shard 1 near-duplicates of some of them
    (an exact byte copy, a half-size copy, a recompressed copy, a 2% crop)."""
    base = tmp_path_factory.mktemp("filter")
    src = base / "src"
    src.mkdir()
    names = sorted(photos)
    for name in names:
        (src / f"a_{name}.jpg").write_bytes(_jpeg(Image.fromarray(photos[name])))
        (src / f"a_{name}.txt").write_text(f"a photo of {name}")
    astro, chelsea, flower = (Image.fromarray(photos[n]) for n in ("astronaut", "chelsea", "flower"))
    shutil.copy(src / "a_coffee.jpg", src / "b_coffee_copy.jpg")
    (src / "b_coffee_copy.txt").write_text("a photo of coffee")
    (src / "b_astronaut_small.jpg").write_bytes(_jpeg(astro.resize((astro.width // 2, astro.height // 2))))
    (src / "b_astronaut_small.txt").write_text("a photo of astronaut")
    (src / "b_chelsea_q30.jpg").write_bytes(_jpeg(chelsea, quality=30))
    (src / "b_chelsea_q30.txt").write_text("a photo of chelsea")
    w, h = flower.size
    (src / "b_flower_crop.jpg").write_bytes(_jpeg(flower.crop((0, 0, int(w * 0.98), int(h * 0.98)))))
    (src / "b_flower_crop.txt").write_text("a photo of flower")
    out = base / "raw"
    assert main(["ingest", "--in", str(src), "--out", str(out), "--shard-size", str(len(names)), *COMMON]) == 0
    assert len(list_shards(str(out))) == 2
    return out


def keys_by_input(folder) -> dict[str, str]:
    t = ledger.read_folder(str(folder))
    return {os.path.splitext(i)[0]: k for i, k in zip(t.column("input_id").to_pylist(), t.column("key").to_pylist())}


def rows(folder) -> list[dict]:
    return ledger.read_folder(str(folder)).to_pylist()


def kept_samples(folder) -> dict[str, dict]:
    out = {}
    for path in list_shards(str(folder)):
        for s in read_shard(path):
            out[s.key] = s.meta()
    return out


def check_every_row(folder, n_in):
    table = rows(folder)
    assert len(table) == n_in
    for r in table:
        if r["outcome"] != "kept":
            assert r["reason"] in ledger.REASONS and r["reason"], r
            assert r["detail"], r


def test_tiny_clip_loads_through_local_dir(tiny_model):
    from filters.clip import load_clip, resolve_clip

    path = tiny_model("tiny-clip")
    a, b = resolve_clip(path), resolve_clip("local-dir:" + path)
    assert a.model_name == b.model_name == "local-dir:" + os.path.abspath(path)
    assert a.score_name == b.score_name and a.score_name.startswith("clip:local:tiny-clip@")
    model = load_clip(a)
    emb = model.encode_images([model.image_tensor(Image.new("RGB", (40, 30), "red"))])
    assert emb.shape == (1, 32) and abs(np.linalg.norm(emb) - 1) < 1e-4
    # names with a pretrained tag and aliases resolve to the same score name (nothing downloaded here)
    assert resolve_clip("ViT-B-32:laion2b_s34b_b79k").score_name == "clip:ViT-B-32:laion2b_s34b_b79k"
    assert resolve_clip("clip-vit-b-32").score_name == "clip:ViT-B-32:laion2b_s34b_b79k"


def test_exact_and_perceptual_dedup_across_shards(raw, tmp_path, tiny_model):
    out = tmp_path / "f"
    assert main(["filter", "--in", str(raw), "--out", str(out), "--clip-model", tiny_model("tiny-clip"),
                 "--dedup", "exact,perceptual", *COMMON]) == 0
    check_every_row(out, 11)
    keys = keys_by_input(raw)
    table = {(r["shard"], r["key"]): r for r in rows(out)}
    # exact copy: same bytes, same caption -> same size and CLIP score -> the lowest shard is kept
    r = table[(1, keys["b_coffee_copy"])]
    assert r["reason"] == "duplicate_exact"
    assert json.loads(r["detail"])["kept_key"] == keys["a_coffee"] and json.loads(r["detail"])["kept_shard"] == 0
    assert table[(0, keys["a_coffee"])]["outcome"] == "kept"
    # resized and cropped copies: the largest is kept
    for copy, orig in (("b_astronaut_small", "a_astronaut"), ("b_flower_crop", "a_flower")):
        r = table[(1, keys[copy])]
        assert r["reason"] == "duplicate_perceptual", r
        assert json.loads(r["detail"])["kept_key"] == keys[orig]
    # recompressed copy: same size, so the higher CLIP score is kept
    a, b = table[(0, keys["a_chelsea"])], table[(1, keys["b_chelsea_q30"])]
    score = lambda r: dict(r["scores"])[next(iter(dict(r["scores"])))]  # noqa: E731
    winner, loser = (a, b) if score(a) >= score(b) else (b, a)
    assert winner["outcome"] == "kept" and loser["reason"] == "duplicate_perceptual"
    assert json.loads(loser["detail"])["kept_key"] == winner["key"]
    # kept samples carry their scores and the filter verdict, in json and in the ledger
    kept = kept_samples(out)
    assert len(kept) == 7
    for meta in kept.values():
        assert meta["filter"]["verdict"] == "kept" and meta["filter"]["reasons"] == []
        assert any(n.startswith("clip:local:tiny-clip@") for n in meta["scores"])
    assert all(r["scores"] for r in rows(out))


def test_semantic_dedup_in_stage(raw, tmp_path, tiny_model):
    out = tmp_path / "f"
    assert main(["filter", "--in", str(raw), "--out", str(out), "--clip-model", tiny_model("tiny-clip"),
                 "--dedup", "semantic", "--semantic-threshold", "0.995", *COMMON]) == 0
    check_every_row(out, 11)
    keys = keys_by_input(raw)
    table = {(r["shard"], r["key"]): r for r in rows(out)}
    r = table[(1, keys["b_astronaut_small"])]
    assert r["reason"] == "duplicate_semantic"
    assert json.loads(r["detail"])["kept_key"] == keys["a_astronaut"]
    plan = json.loads((out / "_plan.json").read_text())
    assert plan["dedup"]["semantic"]["rejected"] >= 1


def _with_scores(raw, out, score_name: str, values: dict[str, float]):
    """Copy raw shards, writing crafted scores into json.scores (keyed by the input's file stem)."""
    for path in list_shards(str(raw)):
        w = ShardWriter(str(out), shard_index(path), "ingest")
        for s in read_shard(path):
            meta = s.meta()
            meta["scores"] = {score_name: values[os.path.splitext(meta["input_id"])[0]]}
            w.write(s.key, {**s.members, "json": dumps_json(meta)})
            w.add_row(ledger.row(s.key, meta["input_id"]))
        w.close()


def _crafted(raw, tmp_path, tiny_model):
    from filters.clip import resolve_clip

    name = resolve_clip(tiny_model("tiny-clip")).score_name
    stems = sorted(keys_by_input(raw))
    # distinct scores; two samples tie at 0.5 (one per shard) to show the tie rule
    values = {stem: round(0.05 + 0.08 * i, 4) for i, stem in enumerate(stems)}
    values["a_rocket"] = values["b_chelsea_q30"] = 0.5
    crafted = tmp_path / "crafted"
    _with_scores(raw, crafted, name, values)
    return crafted, values, name


def _kept_stems(out, raw):
    return {os.path.splitext(r["input_id"])[0] for r in rows(out) if r["outcome"] == "kept"}


def test_keep_top_and_min_clip_score_exact_sets(raw, tmp_path, tiny_model, monkeypatch):
    import pipeline.stages.filter as fstage

    crafted, values, name = _crafted(raw, tmp_path, tiny_model)
    # stored scores of the same model are reused: the model is never loaded
    monkeypatch.setattr(fstage, "load_clip", lambda *a, **k: pytest.fail("model loaded despite stored scores"))
    monkeypatch.setattr("pipeline.runner._MODEL_CACHE", {})
    ranked = sorted(values, key=lambda s: -values[s])

    out = tmp_path / "min"
    assert main(["filter", "--in", str(crafted), "--out", str(out), "--clip-model", tiny_model("tiny-clip"),
                 "--min-clip-score", "0.5", *COMMON]) == 0
    assert _kept_stems(out, raw) == {s for s, v in values.items() if v >= 0.5}
    check_every_row(out, 11)
    assert {r["reason"] for r in rows(out) if r["outcome"] != "kept"} == {"clip_below_threshold"}

    # keep-top 0.3 of 11 -> ceil(3.3) = 4; ranks 4 and 5 tie at 0.5: the lower shard (a_rocket, shard 0) wins
    out = tmp_path / "top"
    assert main(["filter", "--in", str(crafted), "--out", str(out), "--clip-model", tiny_model("tiny-clip"),
                 "--keep-top", "0.3", *COMMON]) == 0
    expect = set(ranked[:3]) | {"a_rocket"}
    assert _kept_stems(out, raw) == expect
    plan = json.loads((out / "_plan.json").read_text())
    assert plan["keep_top"] == {"fraction": 0.3, "candidates": 11, "kept": 4, "threshold": 0.5}
    assert plan["scores_computed"] == 0 and plan["scores_reused"] == 11
    rejected = [r for r in rows(out) if r["outcome"] != "kept"]
    assert len(rejected) == 7 and all(r["reason"] == "clip_below_threshold" for r in rejected)
    assert sorted(dict(r["scores"])[name] for r in rows(out)) == sorted(values.values())


def test_rerun_reuses_stored_scores(raw, tmp_path, tiny_model):
    model = tiny_model("tiny-clip")
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["filter", "--in", str(raw), "--out", str(first), "--clip-model", model, *COMMON]) == 0
    plan1 = json.loads((first / "_plan.json").read_text())
    assert plan1["scores_computed"] == 11 and plan1["scores_reused"] == 0
    assert main(["filter", "--in", str(first), "--out", str(second), "--clip-model", model,
                 "--keep-top", "0.5", *COMMON]) == 0
    plan2 = json.loads((second / "_plan.json").read_text())
    assert plan2["scores_computed"] == 0 and plan2["scores_reused"] == 11
    s1 = {k: m["scores"] for k, m in kept_samples(first).items()}
    for k, m in kept_samples(second).items():
        assert m["scores"] == s1[k]
    # --rescore recomputes (same model: same values)
    third = tmp_path / "third"
    assert main(["filter", "--in", str(first), "--out", str(third), "--clip-model", model, "--rescore", *COMMON]) == 0
    assert json.loads((third / "_plan.json").read_text())["scores_computed"] == 11
    # same folder, same config: a resume does nothing new
    written = {p.name: p.stat().st_mtime_ns for p in second.glob("*.*") if p.suffix in (".tar", ".parquet")}
    assert main(["filter", "--in", str(first), "--out", str(second), "--clip-model", model,
                 "--keep-top", "0.5", *COMMON]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in second.glob("*.*") if p.suffix in (".tar", ".parquet")} == written


def test_image_and_caption_checks_with_rejected_shards(tmp_path, photos):
    src = tmp_path / "src"
    src.mkdir()
    cases = {
        "ok": (Image.fromarray(photos["astronaut"]), "An astronaut in a white suit stands in front of a flag."),
        "blank": (Image.new("RGB", (300, 300), (250, 250, 250)), "A large white empty area on the wall."),
        "small": (Image.fromarray(photos["coffee"]).resize((40, 30)), "A cup of coffee seen from above."),
        "panorama": (Image.fromarray(photos["china"]).crop((0, 0, 640, 100)), "A long view of the temple roof."),
        "empty": (Image.fromarray(photos["chelsea"]), ""),
        "short": (Image.fromarray(photos["rocket"]), "rocket"),
        "german": (Image.fromarray(photos["flower"]), "Eine rosa Blume im Garten, ganz aus der Nähe fotografiert."),
    }
    for name, (img, caption) in cases.items():
        (src / f"{name}.jpg").write_bytes(_jpeg(img))
        (src / f"{name}.txt").write_text(caption)
    raw = tmp_path / "raw"
    assert main(["ingest", "--in", str(src), "--out", str(raw), *COMMON]) == 0
    out, rej = tmp_path / "f", tmp_path / "rejected"
    assert main(["filter", "--in", str(raw), "--out", str(out), "--min-side", "64", "--max-aspect-ratio", "3",
                 "--min-pixel-std", "3", "--reject-empty-caption", "--min-caption-words", "3", "--languages", "en",
                 "--write-rejected", str(rej), *COMMON]) == 0
    check_every_row(out, len(cases))
    by_stem = {os.path.splitext(r["input_id"])[0]: r for r in rows(out)}
    assert by_stem["ok"]["outcome"] == "kept"
    assert by_stem["blank"]["reason"] == "near_blank"
    assert by_stem["small"]["reason"] == "image_too_small"
    assert by_stem["panorama"]["reason"] == "aspect_ratio_too_large"
    assert by_stem["empty"]["reason"] == "caption_empty"
    assert by_stem["short"]["reason"] == "caption_too_short"
    assert by_stem["german"]["reason"] == "caption_language" and "de" in by_stem["german"]["detail"]
    # rejected samples are kept as shards, with their verdict
    rejected = kept_samples(rej)
    assert len(rejected) == len(cases) - 1
    for meta in rejected.values():
        assert meta["filter"]["verdict"] == "rejected" and meta["filter"]["reasons"]
    assert kept_samples(out)[by_stem["ok"]["key"]]["filter"]["language"] == "en"


def test_laion_heads(raw, tmp_path, tiny_model, capsys):
    import torch
    from safetensors.torch import save_file

    model = tiny_model("tiny-clip")
    out = tmp_path / "f"
    # a threshold without weights is an error, never a silent skip
    assert main(["filter", "--in", str(raw), "--out", str(out), "--clip-model", model, "--min-aesthetic", "5",
                 *COMMON]) == 2
    assert "--aesthetic-weights" in capsys.readouterr().err
    torch.manual_seed(0)
    head = tmp_path / "aesthetic.safetensors"   # LAION's improved-aesthetic-predictor layout, 32-d input
    save_file({"layers.0.weight": torch.randn(16, 32), "layers.0.bias": torch.zeros(16),
               "layers.2.weight": torch.randn(1, 16), "layers.2.bias": torch.zeros(1)}, str(head))
    wrong = tmp_path / "wrong.pth"              # a ViT-L/14 (768-d) head on a 32-d CLIP: clear error
    torch.save({"weight": torch.randn(1, 768), "bias": torch.zeros(1)}, str(wrong))
    assert main(["filter", "--in", str(raw), "--out", str(out), "--clip-model", model, "--min-aesthetic", "0",
                 "--aesthetic-weights", str(wrong), *COMMON]) == 2
    assert "768-d" in capsys.readouterr().err
    assert main(["filter", "--in", str(raw), "--out", str(out), "--clip-model", model, "--min-aesthetic", "0",
                 "--aesthetic-weights", str(head), *COMMON]) == 0
    table = rows(out)
    values = [dict(r["scores"])["aesthetic:aesthetic.safetensors"] for r in table]
    assert len(values) == 11
    for r, v in zip(table, values):
        assert (r["reason"] == "aesthetic_below_threshold") == (v < 0), r


def test_bad_settings_are_clear_errors(raw, tmp_path, tiny_model, capsys):
    out = tmp_path / "f"
    # 0 probes would compare nothing: semantic dedup silently off
    assert main(["filter", "--in", str(raw), "--out", str(out), "--clip-model", tiny_model("tiny-clip"),
                 "--dedup", "semantic", "--semantic-probes", "0", *COMMON]) == 2
    assert "--semantic-probes" in capsys.readouterr().err
    # a language name instead of a code would reject every caption
    assert main(["filter", "--in", str(raw), "--out", str(out), "--languages", "english", *COMMON]) == 2
    assert "english" in capsys.readouterr().err
