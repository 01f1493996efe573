"""Caption checks: each returns None (pass) or a `Failure` with a ledger reason code and a detail.

Every check runs on every caption; the first failing one decides the reason. A check that cannot run (its
detector is missing or raises) raises `CheckError`: that is an error of the run, never a pass.
Content checks can be relaxed by name (`CheckConfig.skip`), e.g. for a random tiny model's gibberish.
"""
from __future__ import annotations

import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from captioners.refusals import find_refusal

REFUSAL = "caption_refusal"
TRUNCATED = "caption_truncated"
REPETITION = "caption_repetition"
WRONG_LANGUAGE = "caption_wrong_language"
LENGTH = "caption_length"
TEMPLATE = "caption_template_artefact"
ALL_FAILED = "caption_all_variants_failed"

REASONS: dict[str, tuple[str, str]] = {
    REFUSAL: ("rejected", "the VLM refused or said it cannot see/describe the image"),
    TRUNCATED: ("rejected", "generation stopped at max_new_tokens (finish_reason length / no EOS)"),
    REPETITION: ("rejected", "repetition loop: repeated word n-grams or a low zlib compression ratio"),
    WRONG_LANGUAGE: ("rejected", "caption not in the expected language (or language undetermined), per filters.language "
                                 "(--language-detector)"),
    LENGTH: ("rejected", "caption word count outside the variant's band (or empty, or too many sentences)"),
    TEMPLATE: ("rejected", "chat-template artefact: special tokens, role tags, preambles or markdown in the caption"),
    ALL_FAILED: ("rejected", "every caption variant failed its checks after all retries; detail lists each"),
}

# name used in CheckConfig.skip -> reason code
CHECK_NAMES = {"truncation": TRUNCATED, "template": TEMPLATE, "refusal": REFUSAL, "repetition": REPETITION,
               "length": LENGTH, "language": WRONG_LANGUAGE}
ORDER = ("truncation", "template", "refusal", "repetition", "length", "language")


class CheckError(RuntimeError):
    """A check could not run (e.g. the language detector failed): the stage stops instead of passing it."""


@dataclass
class Failure:
    reason: str
    detail: str


@dataclass
class CheckConfig:
    min_words: int = 0
    max_words: int = 10_000
    max_sentences: int | None = None
    language: str = "en"
    language_detector: str = "fasttext"  # filters.language.DETECTORS
    ngram: int = 4                      # repeated word n-gram size
    max_ngram_repeats: int = 3          # the same n-gram more than this many times is a loop
    max_repeated_ngram_fraction: float = 0.25
    min_compression_ratio: float = 0.30  # zlib bytes / text bytes, judged on texts of >= 300 bytes
    skip: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self):
        unknown = set(self.skip) - set(CHECK_NAMES)
        if unknown:
            raise ValueError(f"unknown check(s) {sorted(unknown)}; known: {', '.join(ORDER)}")


WORD = re.compile(r"[^\W_]+(?:['’\-][^\W_]+)*", re.UNICODE)


def words(text: str) -> list[str]:
    return WORD.findall(text)


def count_words(text: str) -> int:
    return len(words(text))


# ----------------------------------------------------------------------------------------------- checks
def check_truncation(text: str, finish_reason: str, cfg: CheckConfig) -> Failure | None:
    if finish_reason != "stop":
        return Failure(TRUNCATED, f"finish_reason={finish_reason}")
    return None


_TEMPLATE_PATTERNS = [
    (re.compile(r"<\|[a-z_]+\|>"), "special token"),
    (re.compile(r"</?s>|\[/?INST\]|<image>|<img>|</?think>", re.I), "special token"),
    (re.compile(r"^\s*(assistant|user|system|human|gpt)\s*[:\n]", re.I), "role tag"),
    (re.compile(r"\n\s*(assistant|user|system|human)\s*[:\n]", re.I), "role tag"),
    (re.compile(r"^\s*(sure|certainly|of course|okay|here(?:'s| is| are))\b[^.\n]{0,60}[:!.,]", re.I), "preamble"),
    (re.compile(r"^\s*(caption|description|short caption|long caption)\s*:", re.I), "label prefix"),
    (re.compile(r"^\s*#{1,6}\s|^\s*[-*•]\s|\*\*|^\s*\d+\.\s", re.M), "markdown"),
    (re.compile(r"```"), "markdown"),
]


def check_template(text: str, finish_reason: str, cfg: CheckConfig) -> Failure | None:
    for pattern, what in _TEMPLATE_PATTERNS:
        m = pattern.search(text)
        if m:
            return Failure(TEMPLATE, f"{what}: {m.group(0).strip()[:40]!r}")
    return None


def check_refusal(text: str, finish_reason: str, cfg: CheckConfig) -> Failure | None:
    """A refusal as captioners.refusals defines it (the audit counts the same ones)."""
    phrase = find_refusal(text)
    return Failure(REFUSAL, f"matched {phrase!r}") if phrase else None


def check_repetition(text: str, finish_reason: str, cfg: CheckConfig) -> Failure | None:
    toks = [w.lower() for w in words(text)]
    n = cfg.ngram
    if len(toks) >= n:
        grams = Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))
        gram, times = grams.most_common(1)[0]
        if times > cfg.max_ngram_repeats:
            return Failure(REPETITION, f"{n}-gram {' '.join(gram)!r} x{times}")
        repeated = sum(c for c in grams.values() if c > 1)
        total = sum(grams.values())
        if total >= 20 and repeated / total > cfg.max_repeated_ngram_fraction:
            return Failure(REPETITION, f"{repeated}/{total} {n}-grams repeated")
    run = 1
    for a, b in zip(toks, toks[1:]):
        run = run + 1 if a == b else 1
        if run >= 4:
            return Failure(REPETITION, f"word {a!r} repeated {run} times in a row")
    raw = text.encode("utf-8")
    if len(raw) >= 300:
        ratio = len(zlib.compress(raw, 9)) / len(raw)
        if ratio < cfg.min_compression_ratio:
            return Failure(REPETITION, f"compression ratio {ratio:.2f} < {cfg.min_compression_ratio}")
    return None


_SENTENCE_END = re.compile(r"[.!?。！？]+(?=\s+[A-Z\"'(]|\s*$)")


def check_length(text: str, finish_reason: str, cfg: CheckConfig) -> Failure | None:
    n = count_words(text)
    if n < cfg.min_words or n > cfg.max_words:
        return Failure(LENGTH, f"{n} words, band {cfg.min_words}-{cfg.max_words}")
    if cfg.max_sentences is not None:
        sentences = len(_SENTENCE_END.findall(text.strip())) or 1
        if sentences > cfg.max_sentences:
            return Failure(LENGTH, f"{sentences} sentences, at most {cfg.max_sentences}")
    return None


def check_language(text: str, finish_reason: str, cfg: CheckConfig,
                   detector: Callable[[str], tuple[str | None, float]] | None = None) -> Failure | None:
    """`detector(text) -> (iso_639_1 | None, confidence)` is given by the caller (the recaption stage passes
    filters.language.detect_language): captioners import only the contract, never filters."""
    if detector is None:
        raise CheckError("language check cannot run: no language detector given (skip it with relax 'language')")
    try:
        code, conf = detector(text)
    except Exception as exc:  # noqa: BLE001 - a detector failure is an error, not a pass
        raise CheckError(f"language check cannot run: {type(exc).__name__}: {exc}") from exc
    if code is None:
        return Failure(WRONG_LANGUAGE, "language undetermined")
    if code != cfg.language:  # the most likely language is another one, whatever its confidence
        return Failure(WRONG_LANGUAGE, f"{code} ({conf:.2f}), expected {cfg.language}")
    return None


CHECKS = {"truncation": check_truncation, "template": check_template, "refusal": check_refusal,
          "repetition": check_repetition, "length": check_length, "language": check_language}


def run_checks(text: str, finish_reason: str, cfg: CheckConfig,
               detector: Callable[[str], tuple[str | None, float]] | None = None) -> Failure | None:
    """The first failing check (in ORDER), or None. An empty caption always fails (caption_length)."""
    if not text.strip():
        return Failure(LENGTH, "empty caption")
    for name in ORDER:
        if name in cfg.skip:
            continue
        if name == "language":
            result = check_language(text, finish_reason, cfg, detector)
        else:
            result = CHECKS[name](text, finish_reason, cfg)
        if result is not None:
            return result
    return None


def clean(text: str) -> str:
    """Whitespace normalisation applied before checks and before writing (never content edits)."""
    return re.sub(r"[ \t]+", " ", text.replace("\r\n", "\n")).strip()
