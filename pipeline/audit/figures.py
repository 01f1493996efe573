"""The audit's reduce: `GroupAcc.add` merges the shards' `GroupState`s of one group; `GroupAcc.figures()` turns
them into every reported figure (distributions from exact histograms, rates, estimates).

Definitions (the README's audit section repeats them; tests check each on hand-computed caption sets):
- words: `\\w+(?:['’-]\\w+)*` on the lower-cased caption ("state-of-the-art", "don't" are one word each).
- empty: a caption with no word at all (missing text, blank, punctuation only). Length, vocabulary and rate
  figures other than `empty` are over the non-empty captions.
- quantiles: numpy's default (linear interpolation between order statistics), computed exactly from
  integer-length histograms.
- distinct-n: distinct word n-grams / all word n-grams of the group (n-grams never cross captions);
  vocabulary = distinct 1-grams; ttr = mean over captions of (distinct words / words) in that caption.
  Exact up to `distinct_cap` distinct n-grams (64-bit hashes), then a HyperLogLog estimate (p=14, ~0.8%).
- exact duplicates: captions equal after stripping and collapsing whitespace; count = captions minus
  distinct captions (the copies a dedup would drop).
- near duplicates: MinHash (datasketch's legacy scheme and permutations) over word `shingle`-grams, LSH with
  datasketch's optimal bands for `near_threshold`; captions sharing a bucket are linked, count = captions
  minus connected clusters (exact duplicates included).
- loops: a word n-gram (1 <= n <= loop_max_n) repeated `loop_repeats` times back to back.
- refusals: captioners.refusals (REFUSAL_PATTERNS anywhere in the caption), the recaption check's definition.
- wrong language: the `language_detector` of filters.language (fastText lid.176 by default, or lingua) says a
  language other than `language` with confidence >= language_min_confidence; lower confidence or no language
  is `undetermined`. Every non-empty caption is checked unless `language_sample` > 0.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np

from pipeline.audit.sketches import Distinct, IntHist, TopCounts, near_duplicate_clusters
from pipeline.audit.state import CLIP_SCALE, AuditParams, GroupState


class GroupAcc:
    """Merges GroupStates of one group across shards (the reduce); memory as the README states."""

    def __init__(self, params: AuditParams):
        self.params = params
        self.s = GroupState()
        self.first = True
        self.distinct = [Distinct(params.distinct_cap) for _ in range(3)]
        self.dups = Distinct(None)
        self.bands: list[np.ndarray] = []
        self.openings = TopCounts(params.openings_capacity)
        self.clip: dict[str, IntHist] = {}

    def clip_counts(self) -> dict[str, Counter]:
        """Score name -> Counter(round(score * CLIP_SCALE) -> captions), over every shard added so far."""
        return {name: h.counter() for name, h in sorted(self.clip.items())}

    def add(self, g: GroupState) -> None:
        s = self.s
        if self.first:
            s.tokens = None if g.tokens is None else Counter()
            self.first = False
        if (s.tokens is None) != (g.tokens is None):
            s.tokens = None
        for name in ("n", "empty", "over_limit", "ttr_sum", "loops", "refusals", "language_checked",
                     "wrong_language"):
            setattr(s, name, getattr(s, name) + getattr(g, name))
        s.ngrams = [a + b for a, b in zip(s.ngrams, g.ngrams)]
        s.words.update(g.words)
        if s.tokens is not None:
            s.tokens.update(g.tokens)
        for name in ("loop_examples", "refusal_examples", "languages", "models", "prompts"):
            getattr(s, name).update(getattr(g, name))
        for name, c in g.clip.items():
            if name not in self.clip:
                self.clip[name] = IntHist()
            self.clip[name].add(c)
        self.openings.update(g.openings, g.openings_error)
        for n in range(3):
            self.distinct[n].add(g.arrays[f"uniq{n + 1}"])
        self.dups.add(g.arrays["dups"])
        if len(g.arrays["bands"]):
            self.bands.append(g.arrays["bands"])
        for name in ("loop_examples", "refusal_examples"):
            c = getattr(s, name)
            if len(c) > 1000:
                setattr(s, name, Counter(dict(c.most_common(100))))

    def figures(self, word_edges: list[int], token_edges: list[int] | None, clip_edges: dict[str, list[float]],
                token_note: str) -> dict[str, Any]:
        s, p = self.s, self.params
        nonempty = s.n - s.empty
        f: dict[str, Any] = {"count": s.n, "nonempty": nonempty, "empty": _rate(s.empty, s.n)}
        f["words"] = distribution(s.words, word_edges)
        if s.tokens is None:
            f["tokens"] = {"unavailable": token_note}
            f["over_limit"] = {"unavailable": token_note}
        else:
            f["tokens"] = distribution(s.tokens, token_edges or [])
            f["tokens"]["limit"] = p.token_limit
            f["over_limit"] = (_rate(s.over_limit, nonempty) | {"limit": p.token_limit} if p.token_limit is not None
                               else {"unavailable": "the text encoder has no known token limit: pass --token-limit"})
        vocab = {}
        for n in range(3):
            value, exact = self.distinct[n].count()
            vocab[f"distinct_{n + 1}"] = value / s.ngrams[n] if s.ngrams[n] else None
            vocab[f"distinct_{n + 1}_exact"] = exact
            if n == 0:
                vocab["size"] = int(round(value))
        vocab["ngrams"] = list(s.ngrams)
        vocab["ttr"] = s.ttr_sum / nonempty if nonempty else None
        f["vocabulary"] = vocab
        f["openings"] = {"words": p.opening_words, "max_error": self.openings.error,
                         "top": [{"phrase": k, "count": v, "share": v / nonempty if nonempty else 0.0}
                                 for k, v in self.openings.top(p.top_k)]}
        distinct_caps, _ = self.dups.count()
        f["exact_dup"] = _rate(nonempty - int(distinct_caps), nonempty)
        keys = np.concatenate(self.bands) if self.bands else np.zeros((0, 1), dtype=np.uint64)
        clusters = near_duplicate_clusters(keys)
        b, r = p.bands()
        f["near_dup"] = _rate(nonempty - clusters, nonempty) | {"threshold": p.near_threshold, "num_perm": p.num_perm,
                                                                "bands": b, "rows": r, "shingle": p.shingle}
        f["loops"] = _rate(s.loops, nonempty) | {"repeats": p.loop_repeats, "max_n": p.loop_max_n,
                                                 "examples": [k for k, _ in s.loop_examples.most_common(5)]}
        f["refusals"] = _rate(s.refusals, nonempty) | {"examples": [k for k, _ in s.refusal_examples.most_common(5)]}
        if s.language_checked:
            f["wrong_language"] = _rate(s.wrong_language, s.language_checked) | {
                "expected": p.language, "checked": s.language_checked,
                "undetermined": s.languages.get("", 0),
                "languages": dict(sorted(((k or "undetermined"), v) for k, v in s.languages.items()))}
        elif nonempty:
            f["wrong_language"] = {"unavailable": "no language detector (filters.language) could be loaded"}
        else:
            f["wrong_language"] = _rate(0, 0)
        f["clip"] = {name: distribution(c, clip_edges.get(name, []), scale=CLIP_SCALE)
                     for name, c in self.clip_counts().items()}
        f["provenance"] = {"models": dict(s.models.most_common()), "prompts": dict(s.prompts.most_common())}
        return f


def _rate(count: int, total: int) -> dict[str, Any]:
    return {"count": int(count), "rate": (count / total) if total else 0.0}


def hist_quantile(values: np.ndarray, counts: np.ndarray, q: float) -> float:
    """np.percentile(expanded values, 100 q) (linear) computed from a sorted histogram."""
    cum = np.cumsum(counts)
    n = int(cum[-1])
    h = (n - 1) * q
    lo = int(math.floor(h))
    frac = h - lo
    x_lo = values[np.searchsorted(cum, lo, side="right")]
    if frac == 0 or lo + 1 >= n:
        return float(x_lo)
    x_hi = values[np.searchsorted(cum, lo + 1, side="right")]
    return float(x_lo + frac * (x_hi - x_lo))


def distribution(hist: Counter, edges: list, scale: int = 1) -> dict[str, Any]:
    """mean, median, p5, p95, min, max and a histogram over `edges` of an exact value histogram."""
    if not hist or sum(hist.values()) == 0:
        return {"n": 0, "mean": None, "median": None, "p5": None, "p95": None, "min": None, "max": None,
                "histogram": {"edges": list(edges), "counts": [0] * max(len(edges) - 1, 0),
                              "shares": [0.0] * max(len(edges) - 1, 0)}}
    keys = sorted(hist)
    values = np.asarray(keys, dtype=np.float64) / scale
    counts = np.asarray([hist[k] for k in keys], dtype=np.int64)
    n = int(counts.sum())
    out = {"n": n, "mean": float((values * counts).sum() / n),
           "median": hist_quantile(values, counts, 0.5), "p5": hist_quantile(values, counts, 0.05),
           "p95": hist_quantile(values, counts, 0.95), "min": float(values[0]), "max": float(values[-1])}
    if edges:
        e = np.asarray(edges, dtype=np.float64)
        idx = np.clip(np.searchsorted(e, values, side="right") - 1, 0, len(e) - 2)
        binned = np.bincount(idx, weights=counts, minlength=len(e) - 1).astype(np.int64)
        out["histogram"] = {"edges": list(edges), "counts": binned.tolist(), "shares": (binned / n).tolist()}
    return out


def int_edges(max_value: int, target_bins: int = 40) -> list[int]:
    """Integer bin edges [0, w, 2w, ...] past max_value with a 1-2-5 width giving <= target_bins bins."""
    width = 1
    for w in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000):
        width = w
        if (max_value + 1) / w <= target_bins:
            break
    return list(range(0, max_value + width + 1, width))


def float_edges(lo: float, hi: float, bins: int = 40) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0 / CLIP_SCALE
    return [round(lo + (hi - lo) * i / bins, 6) for i in range(bins)] + [hi]
