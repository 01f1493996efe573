"""Caption language detection (lingua-language-detector; its models ship in the wheel, so it works offline).

`detect_language(text) -> (iso_639_1 | None, confidence)`. The detector is built once per process, lazily,
over all 75 of lingua's languages in its default *high accuracy* mode. Its first call loads every 1- to
5-gram model: ~8 s and ~0.9 GB resident on a 2-core machine, once per process (no `with_preloaded_language_models`,
which would pay the same at build time). Low accuracy mode (trigrams only: 0.6 s, ~45 MB) was measured and
rejected as the default: on alt-text-length captions it got "a photo of a coffee" / "a photo of a chelsea"
wrong (lg, nb) where high accuracy says en. Set `PRX_LANGUAGE_ACCURACY=low` where memory matters more than
short captions. Very short texts (one or two words) stay ambiguous in either mode: callers judge the confidence.

Other modules (recaption, audit) import exactly `detect_language`; keep its signature.
"""

from __future__ import annotations

import os
import re
import threading

_DETECTOR = None
_LOCK = threading.Lock()
_HAS_LETTER = re.compile(r"[^\W\d_]", re.UNICODE)


def language_available() -> bool:
    """True when lingua can be imported (it is a dependency; this guards broken installs)."""
    try:
        import lingua  # noqa: F401
    except Exception:  # pragma: no cover - broken install
        return False
    return True


def _detector():
    global _DETECTOR
    if _DETECTOR is None:
        with _LOCK:
            if _DETECTOR is None:
                from lingua import LanguageDetectorBuilder

                builder = LanguageDetectorBuilder.from_all_languages()
                if os.environ.get("PRX_LANGUAGE_ACCURACY", "high").lower() == "low":
                    builder = builder.with_low_accuracy_mode()
                _DETECTOR = builder.build()
    return _DETECTOR


def detect_language(text: str) -> tuple[str | None, float]:
    """Most likely language of `text` as a lowercase ISO 639-1 code ("en") and lingua's confidence in 0..1.

    Returns (None, 0.0) for text with no detectable language (empty, digits/punctuation only, or no
    language with a non-zero confidence)."""
    if not text or not _HAS_LETTER.search(text):
        return None, 0.0
    values = _detector().compute_language_confidence_values(text)
    if not values or values[0].value <= 0.0:
        return None, 0.0
    best = values[0]
    return best.language.iso_code_639_1.name.lower(), float(best.value)
