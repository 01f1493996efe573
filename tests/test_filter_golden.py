"""`prx-data filter` outputs pinned byte for byte on a fixed input: two runs with every kind of check on (image and
caption checks, tiny CLIP score, LAION heads, exact/perceptual/semantic dedup, --keep-top, --write-rejected).

Pinned: the sha256 of every output tar (kept and rejected folders), the ledger rows (every column but the timing
ones), the reason counts in `_stage.json`, the reduce plan, and the config hash (recomputed from the recorded
options and provenance, so a resume of an old folder keeps working). The figures the digests stand for (kept and
rejected counts, which sample got which reason) are asserted too, so a failure says what changed.

The digests hold CLIP and head scores as floats: they were recorded with CPU torch on this project's pinned
packages; another torch build or BLAS may change the last bits (then re-record, after checking the figures).
"""
from __future__ import annotations

import hashlib
import json
import os

import pytest
from PIL import Image

from contract import ledger
from contract.shards import list_shards
from pipeline.cli import main
from test_filter import COMMON, _jpeg

CAPTIONS = {
    "a_astronaut": "An astronaut in a white suit stands in front of a flag.",
    "a_chelsea": "A tabby cat lying down and looking straight at the camera.",
    "a_coffee": "A cup of coffee on a white saucer seen from above.",
    "a_flower": "Eine rosa Blume im Garten, ganz aus der Nähe fotografiert.",
    "a_rocket": "rocket",
    "a_blank": "A large white empty area on the wall of a room.",
    "a_tiny_empty": "",
    "b_panorama": "A long view of the temple roof and the trees around it.",
    "b_coffee_copy": "A cup of coffee on a white saucer seen from above.",
    "b_astronaut_small": "An astronaut in a white suit stands in front of a flag.",
    "b_chelsea_q30": "A tabby cat lying down and looking straight at the camera.",
    "b_china": "A temple with red pillars under a clear blue sky in the summer.",
    "b_histology": "A microscope slide of stained tissue cells in blue and brown.",
    "b_rocket": "A white rocket standing on the launch pad before the start.",
    "b_rocket_crop": "The top of a white rocket on the launch pad before the start.",
}


def _images(photos) -> dict[str, bytes]:
    astro, chelsea, coffee, china, rocket = (Image.fromarray(photos[n])
                                             for n in ("astronaut", "chelsea", "coffee", "china", "rocket"))
    return {
        "a_astronaut": _jpeg(astro), "a_chelsea": _jpeg(chelsea), "a_coffee": _jpeg(coffee),
        "a_flower": _jpeg(Image.fromarray(photos["flower"])), "a_rocket": _jpeg(rocket),
        "a_blank": _jpeg(Image.new("RGB", (300, 300), (250, 250, 250))),
        "a_tiny_empty": _jpeg(coffee.resize((40, 30))),
        "b_panorama": _jpeg(china.crop((0, 0, 640, 100))),
        "b_coffee_copy": _jpeg(coffee),
        "b_astronaut_small": _jpeg(astro.resize((astro.width // 2, astro.height // 2))),
        "b_chelsea_q30": _jpeg(chelsea, quality=30),
        "b_china": _jpeg(china),
        "b_histology": _jpeg(Image.fromarray(photos["immunohistochemistry"])),
        "b_rocket": _jpeg(rocket, quality=85), "b_rocket_crop": _jpeg(rocket.crop((0, 0, 300, 300))),
    }


def _head(path, seed: int) -> None:
    """A LAION-layout head for the tiny CLIP's 32-d embeddings, from a fixed seed."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    save_file({"layers.0.weight": torch.randn(16, 32, generator=g), "layers.0.bias": torch.zeros(16),
               "layers.2.weight": torch.randn(1, 16, generator=g), "layers.2.bias": torch.zeros(1)}, str(path))


@pytest.fixture(scope="module")
def golden_in(tmp_path_factory, photos):
    base = tmp_path_factory.mktemp("golden")
    src = base / "src"
    src.mkdir()
    for stem, data in _images(photos).items():
        (src / f"{stem}.jpg").write_bytes(data)
        (src / f"{stem}.txt").write_text(CAPTIONS[stem], encoding="utf-8")
    raw = base / "raw"
    assert main(["ingest", "--in", str(src), "--out", str(raw), "--shard-size", "8", *COMMON]) == 0
    assert len(list_shards(str(raw))) == 2
    _head(base / "aesthetic.safetensors", 0)
    _head(base / "nsfw.safetensors", 1)
    return base


def _run_a(base, model) -> list[str]:
    """Image and caption checks, CLIP and heads scored (heads without thresholds), three dedups, --keep-top."""
    return ["--clip-model", model, "--min-side", "64", "--max-aspect-ratio", "3", "--min-pixel-std", "3",
            "--max-file-bytes", "10000000", "--reject-empty-caption", "--min-caption-words", "3",
            "--languages", "en", "--min-language-confidence", "0.3",
            "--aesthetic-weights", str(base / "aesthetic.safetensors"),
            "--nsfw-weights", str(base / "nsfw.safetensors"),
            "--dedup", "exact,perceptual,semantic", "--semantic-threshold", "0.995", "--keep-top", "0.8"]


def _run_b(base, model) -> list[str]:
    """Pixel-count, file-size and caption-length checks, then CLIP, aesthetic and NSFW thresholds."""
    return ["--clip-model", model, "--min-clip-score", "-0.195", "--min-pixels", "5000", "--max-pixels", "270000",
            "--min-file-bytes", "2000", "--min-caption-chars", "30",
            "--aesthetic-weights", str(base / "aesthetic.safetensors"), "--min-aesthetic", "0.5",
            "--nsfw-weights", str(base / "nsfw.safetensors"), "--max-nsfw", "0.15"]


RUNS = {"a": _run_a, "b": _run_b}


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ledger_rows(folder) -> list[dict]:
    table = ledger.read_folder(str(folder))
    keep = [c for c in table.column_names if c not in ledger.TIMING_COLUMNS]
    rows = table.select(keep).to_pylist()
    for r in rows:
        r["scores"] = sorted((k, repr(v)) for k, v in r["scores"])
    return sorted(rows, key=lambda r: (r["shard"], r["key"]))


def _ledger_digest(rows: list[dict]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def _placeholders(value, paths: dict[str, str]):
    """Machine-specific paths in recorded values -> <NAME>."""
    if isinstance(value, dict):
        return {k: _placeholders(v, paths) for k, v in value.items()}
    if isinstance(value, list):
        return [_placeholders(v, paths) for v in value]
    if isinstance(value, str):
        for name, path in paths.items():
            value = value.replace(path, f"<{name}>")
    return value


# options that change how a run executes, not what it writes: left out of the config hash (contract.config)
RUNTIME = {"out", "executor", "scheduler", "workers", "overwrite", "config", "progress", "batch_size",
           "decode_threads", "decode", "decode_device"}


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def config_payload(stage: dict) -> dict:
    """What the config hash covers, rebuilt from `_stage.json`: the options that decide the output, and the
    provenance (models, weights, detector)."""
    return {"config": {k: v for k, v in stage["config"].items() if k not in RUNTIME}, "extra": stage["provenance"]}


def observed(base, tmp, out, rej, model) -> dict:
    stage = json.loads((out / "_stage.json").read_text())
    payload = config_payload(stage)
    assert stage["config_hash"] == _digest(payload)[:16]   # the hash is of exactly this payload
    paths = {"MODEL": os.path.abspath(model), "BASE": str(base), "TMP": str(tmp)}
    print("config hash payload:", json.dumps(_placeholders(payload, paths), sort_keys=True))  # shown on failure
    return {
        "tars": {p.name: _sha(p) for p in sorted(out.glob("*.tar"))},
        "rejected_tars": {p.name: _sha(p) for p in sorted(rej.glob("*.tar"))},
        "ledger": _ledger_digest(_ledger_rows(out)),
        "rejected_ledger": _ledger_digest(_ledger_rows(rej)),
        "reasons": stage["counts"]["reasons"],
        "plan": _placeholders(json.loads((out / "_plan.json").read_text()), paths),
        "config_payload": _digest(_placeholders(payload, paths)),
    }


# what each sample's ledger row says (input stem -> reason, "" = kept): the figures the digests below stand for
VERDICTS = {
    "a": {"a_astronaut": "", "a_blank": "near_blank", "a_chelsea": "duplicate_perceptual",
          "a_coffee": "clip_below_threshold", "a_flower": "caption_language", "a_rocket": "caption_too_short",
          "a_tiny_empty": "caption_empty", "b_astronaut_small": "duplicate_perceptual", "b_chelsea_q30": "",
          "b_china": "", "b_coffee_copy": "duplicate_exact", "b_histology": "", "b_panorama": "aspect_ratio_too_large",
          "b_rocket": "", "b_rocket_crop": "duplicate_semantic"},
    "b": {"a_astronaut": "", "a_blank": "nsfw_above_threshold", "a_chelsea": "", "a_coffee": "clip_below_threshold",
          "a_flower": "too_many_pixels", "a_rocket": "caption_too_short", "a_tiny_empty": "caption_empty",
          "b_astronaut_small": "", "b_chelsea_q30": "", "b_china": "too_many_pixels",
          "b_coffee_copy": "clip_below_threshold", "b_histology": "", "b_panorama": "nsfw_above_threshold",
          "b_rocket": "too_many_pixels", "b_rocket_crop": "aesthetic_below_threshold"},
}
# details that show the also-reasons and the score thresholds
DETAILS = {
    "a": {"a_tiny_empty": "empty caption (also: image_too_small)", "a_flower": "language de (0.99) not in en",
          "b_panorama": "aspect ratio 6.4 > 3"},
    "b": {"a_tiny_empty": "empty caption (also: too_few_pixels, file_too_small)",
          "a_rocket": "6 characters < 30 (also: too_many_pixels)",
          "b_rocket_crop": "aesthetic:aesthetic.safetensors 0.3421 < 0.5",
          "a_blank": "nsfw:nsfw.safetensors 0.2257 > 0.15"},
}
SCORE_NAMES = {"aesthetic": "aesthetic:aesthetic.safetensors", "clip": "clip:local:tiny-clip@b9886b249007",
               "nsfw": "nsfw:nsfw.safetensors"}
GOLDEN = {
    "a": {
        "tars": {"000000.tar": "255f58520bdb5db04420f5699847243cbe5422bfb4ec6b351b68b0231c91c1c6",
                 "000001.tar": "b117ac8d74fcd5708c30afd0cd3d6c4e2dfacab9442f3555401783c41a05122f"},
        "rejected_tars": {"000000.tar": "3d457847a189de0752a6dc2b8225e4e54bf4eb38c073ed1fbb993b971a0f234b",
                          "000001.tar": "cf0fff7fe4e15ed406726baa57326c64d549d17f80b1ec598a9fb917fdde14b2"},
        "ledger": "b633fe3981a06394fd91aefd9d7959c3916124e38098734f5b0f7bbe05d2d5c0",
        "rejected_ledger": "069a4c19f44c93400befe246070618ebca2f48e16a8ec457645e5158552751c1",
        "reasons": {"rejected:aspect_ratio_too_large": 1, "rejected:caption_empty": 1, "rejected:caption_language": 1,
                    "rejected:caption_too_short": 1, "rejected:clip_below_threshold": 1,
                    "rejected:duplicate_exact": 1, "rejected:duplicate_perceptual": 2,
                    "rejected:duplicate_semantic": 1, "rejected:near_blank": 1},
        "plan": {"decisions": {"000000.parquet": "f35b262833e594ee", "000001.parquet": "58a0f9a23a15bb75"},
                 "dedup": {"exact": {"groups": 1, "rejected": 1}, "perceptual": {"groups": 2, "rejected": 2},
                           "semantic": {"groups": 1, "rejected": 1}},
                 "keep_top": {"candidates": 6, "fraction": 0.8, "kept": 5, "threshold": -0.15197855234146118},
                 "kept": 5,
                 "rejected_by_reason": {"aspect_ratio_too_large": 1, "caption_empty": 1, "caption_language": 1,
                                        "caption_too_short": 1, "clip_below_threshold": 1, "duplicate_exact": 1,
                                        "duplicate_perceptual": 2, "duplicate_semantic": 1, "near_blank": 1},
                 "samples": 15, "score_names": SCORE_NAMES, "scores_computed": 30, "scores_reused": 0},
        "config_payload": "016a0ef97ffb0a8854659386b36ccac89899ddd2b705e5b6f8b84da9b2670cf1",
    },
    "b": {
        "tars": {"000000.tar": "ab501feaf13080976ae7711cc5053b3f8248c1d9f90ae68140ac18b3b4a2599f",
                 "000001.tar": "5af5ea29bcccac9195bc08e9f07da65db371c094ec2dad4aaaac5112f4310f93"},
        "rejected_tars": {"000000.tar": "2214c789640753848e2e444b1fde951ba4de62fc731830f4adbbe9c3f40f74ef",
                          "000001.tar": "aa4fc4e245ce3aa0ea0b7831f475e7dddbd2387c1b062f4bec50b94a73413c08"},
        "ledger": "add73e8f589acd6b9950fbbe04ec7967ee85dbbe645eeddc835136fb6efd33a4",
        "rejected_ledger": "0372ea263f25e21b846fb769990caef60b4feb3c5660b61481942e3ffb0b2639",
        "reasons": {"rejected:aesthetic_below_threshold": 1, "rejected:caption_empty": 1,
                    "rejected:caption_too_short": 1, "rejected:clip_below_threshold": 2,
                    "rejected:nsfw_above_threshold": 2, "rejected:too_many_pixels": 3},
        "plan": {"decisions": {"000000.parquet": "01da7f44d2314220", "000001.parquet": "a34f95c28a975d6b"},
                 "dedup": {}, "kept": 5, "min_clip_score": -0.195,
                 "rejected_by_reason": {"aesthetic_below_threshold": 1, "caption_empty": 1, "caption_too_short": 1,
                                        "clip_below_threshold": 2, "nsfw_above_threshold": 2, "too_many_pixels": 3},
                 "samples": 15, "score_names": SCORE_NAMES, "scores_computed": 30, "scores_reused": 0},
        "config_payload": "6c647650e58164594319b4b2849aa104298424727692a0424a2ac82d86765bd7",
    },
}


@pytest.mark.parametrize("run", sorted(RUNS))
def test_filter_golden(golden_in, tmp_path, tiny_model, run):
    model = tiny_model("tiny-clip")
    out, rej = tmp_path / "out", tmp_path / "rejected"
    assert main(["filter", "--in", str(golden_in / "raw"), "--out", str(out), "--write-rejected", str(rej),
                 *RUNS[run](golden_in, model), *COMMON]) == 0
    rows = {os.path.splitext(r["input_id"])[0]: r for r in _ledger_rows(out)}
    assert {stem: r["reason"] for stem, r in rows.items()} == VERDICTS[run]
    for stem, detail in DETAILS[run].items():
        assert rows[stem]["detail"] == detail
    rejected = {os.path.splitext(r["input_id"])[0] for r in _ledger_rows(rej)}
    assert rejected == {stem for stem, reason in VERDICTS[run].items() if reason}
    got = observed(golden_in, tmp_path, out, rej, model)
    assert got == GOLDEN[run]


def test_resume_from_scan_partials_written_before_facts(golden_in, tmp_path, tiny_model):
    """A folder whose scan ran before checks reported facts (its `_map` partials hold a `language` column, not
    `facts`) resumes to the same bytes: json.filter.language comes from that column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    model = tiny_model("tiny-clip")
    out, rej = tmp_path / "out", tmp_path / "rejected"
    argv = ["filter", "--in", str(golden_in / "raw"), "--out", str(out), "--write-rejected", str(rej),
            *_run_a(golden_in, model), *COMMON]
    assert main(argv) == 0
    for path in sorted((out / "_map").glob("*.parquet")):
        table = pq.read_table(path)
        at = table.column_names.index("facts")
        language = [json.loads(f).get("language") for f in table.column("facts").to_pylist()]
        pq.write_table(table.remove_column(at).add_column(at, "language", pa.array(language, pa.string())), path)
    for name in ("000001.tar", "000001.parquet"):
        (out / name).unlink()
    assert main(argv) == 0
    assert _sha(out / "000001.tar") == GOLDEN["a"]["tars"]["000001.tar"]
    assert _sha(rej / "000001.tar") == GOLDEN["a"]["rejected_tars"]["000001.tar"]
    assert json.loads((out / "_stage.json").read_text())["counts"]["shards_resumed"] == 1
