"""What every filter returns: a `Judgement` (score, reason, detail).

`reason` is "" when the sample passes, else a stable code (registered in the ledger by the filter stage,
which maps these codes to ledger outcomes). `score` is the measured value the decision was made on (a
side length, a ratio, a word count, a confidence), so a rejection always carries its value.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Judgement:
    check: str                 # which check made it (min_side, language, ...)
    score: float | None        # the measured value
    reason: str = ""           # "" = pass; else a reason code
    detail: str = ""           # human-readable: value vs threshold

    @property
    def passed(self) -> bool:
        return not self.reason


def passed(check: str, score: float | None) -> Judgement:
    return Judgement(check, score)


def failed(check: str, score: float | None, reason: str, detail: str) -> Judgement:
    return Judgement(check, score, reason, detail)
