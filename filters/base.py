"""What a filter is: a plug-in the filter stage builds from its options and runs (datatrove's lesson: a filter is
one method), keeping prx's judgement (a measured value, a stable reason, a detail, every failed check listed).

A filter is a dataclass whose fields are its options, each declared with `contract.config.option` (name, default,
help, bounds): they become `prx-data filter` flags and manifest keys. Its class says:
  name     the check it makes (`json.filter.checks` keys, score roles in `_plan.json`);
  reasons  its reason codes, code -> (ledger outcome, meaning), registered in the ledger by the stage;
  active() whether the configured options turn it on; validate() raises PrxError before any work;
  provenance() what decided (model, weights, detector): hashed with the config.
Two kinds:
  Check        a cheap per-sample `judge(view) -> Judgement` (or a list of them: one filter measuring several
               things). `needs` says what it reads: "caption" (runs before any decode, on samples nothing rejected
               yet), "size" (width, height, file bytes) or "pixels" (the decoded image); size and pixel checks run
               on every decoded sample, so a rejected sample's detail lists each image problem too.
  ScoreFilter  a batched `score(batch) -> one float per sample` on the shared CLIP image embeddings; the stage
               stores it under `score_name()`, reuses stored values, rejects by `threshold_option` in the reduce
               and, with `top_option`, keeps a global top fraction after dedup.
The registry in `filters/__init__.py` lists the filters, one line each, in the order they run.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

NEEDS = ("caption", "size", "pixels")


@dataclass(frozen=True)
class Judgement:
    check: str                 # which check made it (min_side, language, ...)
    score: float | None        # the measured value
    reason: str = ""           # "" = pass; else a reason code
    detail: str = ""           # human-readable: value vs threshold
    final: bool = False        # a failure that makes the sample's later checks of the same input meaningless
    facts: dict = field(default_factory=dict, hash=False)  # what it found, for json.filter (language: de)

    @property
    def passed(self) -> bool:
        return not self.reason


def passed(check: str, score: float | None, **facts: Any) -> Judgement:
    return Judgement(check, score, facts=facts)


def failed(check: str, score: float | None, reason: str, detail: str, final: bool = False, **facts: Any) -> Judgement:
    return Judgement(check, score, reason, detail, final, facts)


@dataclass
class View:
    """One sample as a check sees it; width, height and image are filled for "size" and "pixels" checks."""

    key: str
    meta: dict                 # the json member ({} when unreadable)
    text: str                  # the source caption (`txt`), "" when none
    nbytes: int = 0            # size of the image member
    width: int | None = None   # after EXIF orientation
    height: int | None = None
    image: Any = None          # RGB PIL image ("pixels" checks)


def _build_now(key: Any, build: Callable[[], Any]) -> Any:
    return build()


@dataclass(frozen=True)
class Context:
    """What the stage lends every filter: the shared CLIP model's spec (None without --clip-model) and a cache
    that builds a model once per worker process (`cached(key, build)`)."""

    clip: Any = None           # filters.clip.ClipSpec
    cached: Callable[[Any, Callable[[], Any]], Any] = _build_now


class Filter:
    name: ClassVar[str] = ""
    reasons: ClassVar[dict[str, tuple[str, str]]] = {}
    ctx: Context = Context()

    @classmethod
    def build(cls, cfg: Any, ctx: Context) -> "Filter":
        """This filter with its options read from the stage's config (fields of the same names)."""
        made = cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})
        object.__setattr__(made, "ctx", ctx)   # a frozen filter too
        return made

    def active(self) -> bool:
        return True

    def validate(self) -> None:
        """Raise contract.errors.PrxError when the options cannot work (called whether active or not)."""

    def provenance(self) -> dict[str, Any]:
        return {}

    def clip_flags(self) -> list[str]:
        """The flags set on this filter that need --clip-model."""
        return []


class Check(Filter):
    needs: ClassVar[str] = "caption"

    def judge(self, view: View) -> Judgement | list[Judgement]:
        raise NotImplementedError(f"{type(self).__name__} defines no judge()")


@dataclass
class ScoreBatch:
    """Samples still in the running, with their CLIP image embeddings (L2-normalised, one row each)."""

    image_emb: np.ndarray
    samples: list              # contract.shards.Sample
    clip: Any                  # filters.clip.ClipModel (encode_texts for image-text scores)

    @property
    def texts(self) -> list[str]:
        return [s.text("txt") or "" for s in self.samples]

    def subset(self, rows: list[int]) -> "ScoreBatch":
        return ScoreBatch(self.image_emb[rows], [self.samples[k] for k in rows], self.clip)


class ScoreFilter(Filter):
    reason: ClassVar[str] = ""                   # the code its threshold (and top fraction) rejects with
    threshold_option: ClassVar[str] = ""         # the option holding the threshold ("": score only)
    direction: ClassVar[str] = "min"             # "min": reject below the threshold; "max": reject above
    top_option: ClassVar[str | None] = None      # the option holding a global top fraction, if any

    def score_name(self) -> str | None:
        """The name its scores are stored under (json.scores, ledger); None when it scores nothing this run."""
        raise NotImplementedError(f"{type(self).__name__} defines no score_name()")

    def score(self, batch: ScoreBatch) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} defines no score()")

    def active(self) -> bool:
        return self.score_name() is not None

    def threshold(self) -> float | None:
        return getattr(self, self.threshold_option) if self.threshold_option else None

    def top_fraction(self) -> float | None:
        return getattr(self, self.top_option) if self.top_option else None

    def rejects(self, value: float) -> str | None:
        """The detail when `value` fails the threshold, else None."""
        limit = self.threshold()
        if limit is None or not (value < limit if self.direction == "min" else value > limit):
            return None
        return f"{self.score_name()} {value:.4f} {'<' if self.direction == 'min' else '>'} {limit:g}"

    def plan(self) -> dict[str, Any]:
        """What it adds to the reduce's plan (`_plan.json`)."""
        return {}


def keep_top_threshold(scores: np.ndarray, fraction: float) -> tuple[int, float | None]:
    """(how many to keep, score of the last kept) for keeping the top `fraction`: ceil(fraction * n)."""
    n = len(scores)
    if n == 0:
        return 0, None
    k = min(n, max(0, math.ceil(fraction * n - 1e-9)))
    if k == 0:
        return 0, None
    return k, float(np.sort(scores)[::-1][k - 1])
