"""Checks on the source caption (the `txt` member): empty, too short, language.

Language uses `filters.language` (fastText lid.176 by default, or lingua; both offline). A caption passes the
language check when its detected language is one of `languages` with confidence >= `min_confidence`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from filters.base import Judgement, failed, passed
from filters.language import DEFAULT_DETECTOR, get_detector

REASONS = {
    "caption_empty": "source caption is empty or whitespace only",
    "caption_too_short": "source caption has fewer than --min-caption-words words or --min-caption-chars characters",
    "caption_language": "source caption's detected language not in --languages, or its confidence below "
                        "--min-language-confidence",
}


def words(text: str) -> int:
    return len(text.split())


def empty(text: str) -> Judgement:
    if not text.strip():
        return failed("empty", 0, "caption_empty", "empty caption")
    return passed("empty", len(text.strip()))


def too_short(text: str, min_words: int = 0, min_chars: int = 0) -> Judgement:
    n_words, n_chars = words(text), len(text.strip())
    if n_words < min_words:
        return failed("min_words", n_words, "caption_too_short", f"{n_words} words < {min_words}")
    if n_chars < min_chars:
        return failed("min_chars", n_chars, "caption_too_short", f"{n_chars} characters < {min_chars}")
    return passed("min_words", n_words)


def language(text: str, allowed: list[str], min_confidence: float = 0.0,
             detector: str = DEFAULT_DETECTOR) -> tuple[Judgement, str | None]:
    """(judgement, detected code). The judgement's score is the confidence."""
    code, conf = get_detector(detector)(text)
    allowed = [a.lower() for a in allowed]
    if code is None:
        return failed("language", 0.0, "caption_language", "no detectable language"), None
    if code not in allowed:
        return failed("language", conf, "caption_language",
                      f"language {code} ({conf:.2f}) not in {','.join(allowed)}"), code
    if conf < min_confidence:
        return failed("language", conf, "caption_language",
                      f"language {code} confidence {conf:.2f} < {min_confidence:g}"), code
    return passed("language", conf), code


@dataclass
class TextChecks:
    reject_empty: bool = False
    min_words: int = 0
    min_chars: int = 0
    languages: list[str] = field(default_factory=list)
    min_language_confidence: float = 0.0
    language_detector: str = DEFAULT_DETECTOR

    @property
    def active(self) -> bool:
        return bool(self.reject_empty or self.min_words or self.min_chars or self.languages)

    def run(self, text: str) -> tuple[list[Judgement], str | None]:
        """Judgements in order (empty, short, language) and the detected language (None if not checked).
        Checks after an empty caption are skipped: one empty caption, one reason."""
        out: list[Judgement] = []
        if self.reject_empty or self.min_words or self.min_chars:
            j = empty(text)
            if not j.passed:
                return [j], None
            out.append(j)
        if self.min_words or self.min_chars:
            out.append(too_short(text, self.min_words, self.min_chars))
        code = None
        if self.languages:
            j, code = language(text, self.languages, self.min_language_confidence, self.language_detector)
            out.append(j)
        return out, code
