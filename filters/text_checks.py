"""Checks on the source caption (the `txt` member): empty or too short (`CaptionLength`), language (`Language`).

Language uses `filters.language` (fastText lid.176 by default, or lingua; both offline). A caption passes the
language check when its detected language is one of `languages` with confidence >= `min_confidence`. An empty
caption is one reason, not three: its judgement is final, so the caption checks after it skip the sample.
"""
from __future__ import annotations

from dataclasses import dataclass

from contract.config import option
from contract.errors import PrxError
from contract.ledger import REJECTED
from filters.base import Check, Judgement, View, failed, passed
from filters.language import DEFAULT_DETECTOR, get_detector


def words(text: str) -> int:
    return len(text.split())


def empty(text: str) -> Judgement:
    if not text.strip():
        return failed("empty", 0, "caption_empty", "empty caption", final=True)
    return passed("empty", len(text.strip()))


def too_short(text: str, min_words: int = 0, min_chars: int = 0) -> Judgement:
    n_words, n_chars = words(text), len(text.strip())
    if n_words < min_words:
        return failed("min_words", n_words, "caption_too_short", f"{n_words} words < {min_words}")
    if n_chars < min_chars:
        return failed("min_chars", n_chars, "caption_too_short", f"{n_chars} characters < {min_chars}")
    return passed("min_words", n_words)


def language(text: str, allowed: list[str], min_confidence: float = 0.0,
             detector: str = DEFAULT_DETECTOR) -> Judgement:
    """The judgement's score is the confidence; its facts hold the detected code (`language`), if any."""
    code, conf = get_detector(detector)(text)
    allowed = [a.lower() for a in allowed]
    if code is None:
        return failed("language", 0.0, "caption_language", "no detectable language")
    if code not in allowed:
        return failed("language", conf, "caption_language", f"language {code} ({conf:.2f}) not in {','.join(allowed)}",
                      language=code)
    if conf < min_confidence:
        return failed("language", conf, "caption_language",
                      f"language {code} confidence {conf:.2f} < {min_confidence:g}", language=code)
    return passed("language", conf, language=code)


@dataclass
class CaptionLength(Check):
    """Empty captions, and captions with too few words or characters (an empty one is `caption_empty`)."""

    name = "caption_length"
    needs = "caption"
    reasons = {"caption_empty": (REJECTED, "source caption is empty or whitespace only"),
               "caption_too_short": (REJECTED, "source caption has fewer than --min-caption-words words or "
                                               "--min-caption-chars characters")}
    reject_empty_caption: bool = option(False, help="reject empty or whitespace-only captions")
    min_caption_words: int = option(0, help="reject captions with fewer words", minimum=0)
    min_caption_chars: int = option(0, help="reject captions with fewer characters", minimum=0)

    def active(self) -> bool:
        return bool(self.reject_empty_caption or self.min_caption_words or self.min_caption_chars)

    def judge(self, view: View) -> Judgement | list[Judgement]:
        first = empty(view.text)
        if not first.passed or not (self.min_caption_words or self.min_caption_chars):
            return first
        return [first, too_short(view.text, self.min_caption_words, self.min_caption_chars)]


@dataclass
class Language(Check):
    name = "language"
    needs = "caption"
    reasons = {"caption_language": (REJECTED, "source caption's detected language not in --languages, or its "
                                              "confidence below --min-language-confidence")}
    languages: list[str] = option(default_factory=list, help="keep captions in these languages (comma-separated "
                                                             "ISO 639-1 codes, e.g. en,de; offline detector)")
    min_language_confidence: float = option(0.0, help="detector confidence the caption's language needs")
    language_detector: str = option(DEFAULT_DETECTOR, help="language identification for --languages: fasttext "
                                                           "(lid.176, default) or lingua")

    def active(self) -> bool:
        return bool(self.languages)

    def judge(self, view: View) -> Judgement:
        return language(view.text, self.languages, self.min_language_confidence, self.language_detector)

    def validate(self) -> None:
        if not self.languages:
            return
        from filters import language as lang

        try:
            lang.check_detector(self.language_detector)
        except lang.UnknownDetector as exc:
            raise PrxError(f"--language-detector: {exc}") from None
        if not lang.language_available(self.language_detector):
            raise PrxError(f"--languages: the {self.language_detector} detector cannot load (a dependency: "
                           "reinstall prx)")
        known = lang.supported_languages(self.language_detector)
        unknown = [code for code in self.languages if code.lower() not in known]
        if unknown:  # else every caption would be rejected as caption_language
            raise PrxError(f"--languages: unknown language code(s) {unknown} for --language-detector "
                           f"{self.language_detector}; use two-letter codes like en,de")

    def provenance(self) -> dict:
        if not self.languages:
            return {}
        from filters.language import detector_provenance

        return {"language": detector_provenance(self.language_detector)}
