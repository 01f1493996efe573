"""A new filter is one file plus one registry line: two filters written here as modules (a per-sample `Check` and a
batched `ScoreFilter` on the CLIP embeddings) are added to `filters.FILTERS` with one line each, in a fresh
`prx-data` process (as the line in filters/__init__.py would be), and run in `prx-data filter`: their flags are in
`--help`, their options are flags and config-file keys, their reason codes are in the ledger and in `_stage.json`'s
counts, their check and score in the kept samples' json."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from PIL import Image

from contract import ledger
from contract.shards import list_shards, read_shard
from pipeline.cli import main
from test_filter import COMMON, _jpeg

REPO = Path(__file__).resolve().parent.parent

CAPTION_WORDS = '''
from dataclasses import dataclass

from contract.config import option
from contract.ledger import REJECTED
from filters.base import Check, failed, passed


@dataclass
class MaxCaptionWords(Check):
    name = "max_words"
    needs = "caption"
    reasons = {"caption_too_long": (REJECTED, "source caption has more than --max-caption-words words")}
    max_caption_words: int | None = option(None, help="reject captions with more words", minimum=1)

    def active(self):
        return self.max_caption_words is not None

    def judge(self, view):
        n = len(view.text.split())
        if n > self.max_caption_words:
            return failed("max_words", n, "caption_too_long", f"{n} words > {self.max_caption_words}")
        return passed("max_words", n)
'''

CONCEPT = '''
from dataclasses import dataclass

from contract.config import option
from contract.ledger import REJECTED
from filters.base import ScoreFilter
from filters.clip import clip_scores


@dataclass
class ConceptScore(ScoreFilter):
    """CLIP cosine between the image and a fixed text (a concept to leave out)."""

    name = "concept"
    reason = "concept_match"
    reasons = {reason: (REJECTED, "CLIP cosine to --concept-prompt above --max-concept-score")}
    threshold_option, direction = "max_concept_score", "max"
    concept_prompt: str | None = option(None, help="a text the images are compared with (needs --clip-model)")
    max_concept_score: float | None = option(None, help="reject images closer than this to --concept-prompt")

    def score_name(self):
        return f"concept:{self.concept_prompt}" if self.concept_prompt and self.ctx.clip else None

    def score(self, batch):
        text = batch.clip.encode_texts([self.concept_prompt] * len(batch.samples))
        return clip_scores(batch.image_emb, text)
'''

# the registry lines a new filter adds to filters/__init__.py, here added in a fresh process
DRIVER = '''
import sys

import filters

filters.FILTERS.append("caption_words:MaxCaptionWords")
filters.FILTERS.append("concept:ConceptScore")

from pipeline.cli import main  # noqa: E402 - after the registry lines, as the stage reads them on import

sys.exit(main(sys.argv[1:]))
'''

CAPTIONS = {
    "astronaut": "An astronaut in a white suit.",
    "chelsea": "A tabby cat lying on a rug and looking straight at the camera from below.",
    "coffee": "A cup of coffee on a saucer.",
    "rocket": "A rocket on the launch pad.",
    "china": "A temple with red pillars under a clear blue sky, seen from the garden in summer.",
}


def _prx(plugins: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugins), str(REPO)])}
    return subprocess.run([sys.executable, str(plugins / "driver.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_new_filters_are_one_file_and_one_registry_line_each(tmp_path, photos, tiny_model):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    for name, source in (("caption_words.py", CAPTION_WORDS), ("concept.py", CONCEPT), ("driver.py", DRIVER)):
        (plugins / name).write_text(textwrap.dedent(source))
    src = tmp_path / "src"
    src.mkdir()
    for stem, caption in CAPTIONS.items():
        (src / f"{stem}.jpg").write_bytes(_jpeg(Image.fromarray(photos[stem])))
        (src / f"{stem}.txt").write_text(caption)
    raw = tmp_path / "raw"
    assert main(["ingest", "--in", str(src), "--out", str(raw), *COMMON]) == 0

    shown = _prx(plugins, "filter", "--help")
    assert shown.returncode == 0, shown.stderr
    assert "--max-caption-words" in shown.stdout and "--concept-prompt" in shown.stdout

    config = tmp_path / "filter.yaml"   # a manifest/config key is the flag without dashes
    config.write_text("concept-prompt: a photo of a cat\nmax-concept-score: 0.0\n")
    out = tmp_path / "out"
    done = _prx(plugins, "filter", "--in", str(raw), "--out", str(out), "--clip-model", tiny_model("tiny-clip"),
                "--max-caption-words", "8", "--config", str(config), *COMMON)
    assert done.returncode == 0, done.stderr

    rows = {os.path.splitext(r["input_id"])[0]: r for r in ledger.read_folder(str(out)).to_pylist()}
    long = {stem for stem, caption in CAPTIONS.items() if len(caption.split()) > 8}
    assert long == {"chelsea", "china"}
    assert {stem for stem, r in rows.items() if r["reason"] == "caption_too_long"} == long
    assert rows["china"]["detail"] == "16 words > 8"
    concept = "concept:a photo of a cat"
    for stem, r in rows.items():   # the images scored, each rejected exactly when its score is above 0.0
        if stem not in long:
            score = dict(r["scores"])[concept]
            assert (r["reason"] == "concept_match") == (score > 0.0), r
            assert r["reason"] in ("", "concept_match")
    matched = {stem for stem, r in rows.items() if r["reason"] == "concept_match"}
    assert matched, "no sample above the concept threshold: the score filter's reason never shows"

    stage = json.loads((out / "_stage.json").read_text())
    assert stage["counts"]["reasons"] == {"rejected:caption_too_long": 2, "rejected:concept_match": len(matched)}
    assert stage["config"]["max_caption_words"] == 8 and stage["config"]["concept_prompt"] == "a photo of a cat"
    kept = [s.meta() for p in list_shards(str(out)) for s in read_shard(p)]
    assert len(kept) == len(CAPTIONS) - 2 - len(matched)
    for meta in kept:
        assert meta["filter"]["checks"]["max_words"] <= 8 and concept in meta["scores"]
