"""What counts as a refused caption: the one definition that the recaption check (`captioners.checks`: the
caption is rejected, `caption_refusal`) and the audit (`pipeline/audit/scan.py`: the `refusals` figure) share.

A refusal is a phrase, not a prefix: the VLM apologising, speaking as an AI or a language model, saying it
cannot help with, see or describe the image, or that there is no image. "I can't" or "I cannot" alone is not
one (a caption may quote a sign reading "I can't wait"); "I cannot describe" is. The patterns read the
caption lower-cased with ’ as ' (`normalise`), and match anywhere in it.
"""
from __future__ import annotations

import re

REFUSAL_PATTERNS = [
    r"\bi'?m sorry\b",
    r"\bi am sorry\b",
    r"\bi apologi[sz]e\b",
    r"\bi(?: can't| cannot| can not| am unable to|'m unable to| am not able to|'m not able to) "
    r"(?:help|assist|provide|describe|identify|see|view|process|comply|fulfil|fulfill|determine|access|caption)",
    r"\bas an ai\b",
    r"\bas a language model\b",
    r"\bi do(?:n'?t| not) (?:see|have) (?:an|any|the) image",
    r"\bno image (?:was|is|has been) (?:provided|attached|uploaded|shared|shown)",
    r"\b(?:unable to|cannot) (?:view|see|process|describe|open|identify|determine) (?:the|this|an|any) image",
    r"\bthere(?: is|'s) no image\b",
    r"\b(?:image|picture) is (?:not |un)available\b",
]
# every pattern starts with a word starting with one of these letters: the lookahead skips other positions
FIRST_LETTERS = "acinptu"
REFUSAL_RE = re.compile(f"(?=[{FIRST_LETTERS}])(?:" + "|".join(f"(?:{p})" for p in REFUSAL_PATTERNS) + ")")


def normalise(lowered: str) -> str:
    """A lower-cased caption as the patterns read it: ’ as '."""
    return lowered.replace("’", "'")


def may_refuse(text: str) -> bool:
    """False when no REFUSAL_PATTERNS can match a `normalise`d caption: every match holds one of these
    substrings (a test checks each pattern); eight substring searches instead of the regex for almost every
    caption."""
    return "i " in text or "i'" in text or "m sorry" in text or "as a" in text or "no image" in text \
        or "unable to" in text or "cannot " in text or "available" in text


def find_refusal(text: str) -> str | None:
    """The refusal phrase in a caption (as the patterns read it: lower-cased, ’ as '), or None."""
    lowered = normalise(text.lower())
    m = REFUSAL_RE.search(lowered) if may_refuse(lowered) else None
    return m.group(0) if m else None
