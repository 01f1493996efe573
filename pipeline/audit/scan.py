"""The audit's map: `scan_group(texts, ...)` turns one shard's captions of one group into a `GroupState` (the
figures' definitions: pipeline/audit/figures.py)."""
from __future__ import annotations

import re
import time
from collections import Counter
from itertools import chain
from typing import Any, Iterable

import numpy as np

from captioners.refusals import REFUSAL_RE, may_refuse, normalise
from pipeline.audit.sketches import TopCounts, combine, minhash_signatures, text_hashes, unique, word_ids
from pipeline.audit.state import CLIP_SCALE, AuditParams, GroupState


WORD_RE = re.compile(r"\w+(?:['’\-]\w+)*")
SPACE_RE = re.compile(r"\s+")
_LANGUAGE_CACHE: dict[Any, dict[str, str]] = {}
_LANGUAGE_CACHE_SIZE = 100_000


def _language_cache(key) -> dict[str, str]:
    """Per-process memo of the language code ("" below the confidence) by stripped caption, per (detector,
    confidence): the detector is a pure function of the text, so a repeated caption - duplicates, stock
    refusals - costs one detection; the figures are unchanged."""
    if key not in _LANGUAGE_CACHE and len(_LANGUAGE_CACHE) >= 4:
        _LANGUAGE_CACHE.clear()
    return _LANGUAGE_CACHE.setdefault(key, {})


def load_kernels() -> float:
    """Load the compiled kernels in this process now (each process does it on its first call otherwise);
    returns the CPU seconds of this thread that took (0.0 once loaded)."""
    if _KERNELS_LOADED:
        return 0.0
    t0 = time.thread_time()
    minhash_signatures(np.ones(1, dtype=np.uint64), np.zeros(1, dtype=np.int64), 1, 2, (1, 2))
    _distinct_per_caption(np.ones(1, dtype=np.uint64), np.zeros(1, dtype=np.int64), np.ones(1, dtype=np.int64))
    _KERNELS_LOADED.append(True)
    return time.thread_time() - t0


_KERNELS_LOADED: list[bool] = []


# ASCII captions without ' and -: WORD_RE's words are the runs of [a-z0-9_], found by str.translate + split
_ASCII_NON_WORD = str.maketrans({chr(c): " " for c in range(128) if not (chr(c).isalnum() or chr(c) == "_")})


def _words(lowered: str) -> list[str]:
    """WORD_RE.findall(lowered), with a fast exact path for plain ASCII text (most alt-texts and captions)."""
    if lowered.isascii() and "'" not in lowered and "-" not in lowered:
        return lowered.translate(_ASCII_NON_WORD).split()
    return WORD_RE.findall(lowered)


def words_of(text: str) -> list[str]:
    return _words(text.lower())


def scan_group(texts: list[str], params: AuditParams, token_counts: list[int] | None = None,
               clip: Iterable[dict[str, float]] = (), provenance: Iterable[dict] = (),
               detect=None, timing: dict[str, float] | None = None) -> GroupState:
    """One shard's captions of one group -> GroupState. `token_counts` aligns with `texts` (None: no
    tokenizer); `clip` and `provenance` are per-sample dicts; `detect` is a filters.language detector or None;
    `timing`, when given, accumulates the CPU seconds (this thread's) spent in `detect` under "language".

    Python touches each caption a few times (lower-case, word regex, whitespace collapse, hash, refusal
    regex, language); everything per word (hashes, n-grams, type-token ratios, MinHash, loops) is numpy over
    the whole shard."""
    s = GroupState(n=len(texts), tokens=None if token_counts is None else Counter())
    _add_clip_provenance(s, clip, provenance)
    lowered = [t.lower() for t in texts]
    word_lists = list(map(_words, lowered))
    lens = np.fromiter(map(len, word_lists), dtype=np.int64, count=len(texts))
    kept = np.flatnonzero(lens)
    s.empty = len(texts) - len(kept)
    if not len(kept):
        s.arrays = _empty_arrays(params)
        return s
    if s.empty:
        texts, lowered, word_lists = ([x[i] for i in kept] for x in (texts, lowered, word_lists))
    lens = lens[kept]
    s.words.update(lens.tolist())
    if token_counts is not None:
        tc = [token_counts[i] for i in kept]
        s.tokens.update(tc)
        if params.token_limit is not None:
            s.over_limit = sum(1 for c in tc if c > params.token_limit)
    _caption_figures(s, texts, lowered, word_lists, params)
    if detect is not None:
        t0 = time.thread_time()
        _languages(s, texts if not params.language_sample else texts[:params.language_sample], detect, params)
        if timing is not None:
            timing["language"] = timing.get("language", 0.0) + time.thread_time() - t0
    flat = list(chain.from_iterable(word_lists))
    s.arrays = {"dups": unique(text_hashes([" ".join(t.split()) for t in texts]))}
    _word_figures(s, flat, lens, params)
    return s


_CLIP_EXACT = 2.0 ** 52 / CLIP_SCALE   # below this, numpy's rint of score * 1e4 is Python's round(), exactly


def _add_clip_provenance(s: GroupState, clip: Iterable[dict[str, float]], provenance: Iterable[dict]) -> None:
    values: dict[str, list[float]] = {}
    for scores in clip:
        for name, value in scores.items():
            values.setdefault(name, []).append(float(value))
    for name, v in values.items():
        counts = s.clip.setdefault(name, Counter())
        arr = np.asarray(v, dtype=np.float64)
        if not np.isfinite(arr).all() or np.abs(arr).max() >= _CLIP_EXACT:   # huge: Python ints, one by one
            counts.update(int(round(x * CLIP_SCALE)) for x in v)
            continue
        q = np.rint(arr * CLIP_SCALE).astype(np.int64)          # round half to even, as round() does
        keys, first, n = np.unique(q, return_index=True, return_counts=True)
        order = np.argsort(first, kind="stable")                 # keys in order of first appearance
        counts.update(dict(zip(keys[order].tolist(), n[order].tolist())))
    provenance = list(provenance)              # every dict alive at once: their ids are distinct
    by_id = {id(p): p for p in provenance}     # one provenance dict is often shared by many captions
    for key, n in Counter(map(id, provenance)).items():
        model, prompt = _provenance_fields(by_id[key])
        s.models[model] += n
        s.prompts[prompt] += n


def _caption_figures(s: GroupState, texts: list[str], lowered: list[str], word_lists: list[list[str]],
                     params: AuditParams) -> None:
    """Opening phrases and refusals of the non-empty captions."""
    ow = params.opening_words
    s.openings.update([" ".join(ws[:ow]) for ws in word_lists])
    if len(s.openings) > params.openings_capacity:
        top = TopCounts(params.openings_capacity)
        top.update(s.openings)
        s.openings, s.openings_error = top.counts, top.error
    maybe = [t for t in map(normalise, lowered) if may_refuse(t)]
    hits = [m.group(0) for m in map(REFUSAL_RE.search, maybe) if m]
    s.refusals = len(hits)
    s.refusal_examples.update(hits)


def _languages(s: GroupState, texts: list[str], detect, params: AuditParams) -> None:
    """Detected language of each caption (stripped), memoised per process; below the confidence: ""."""
    min_conf = params.language_min_confidence
    cache = _language_cache((detect, min_conf))
    if len(cache) + len(texts) > _LANGUAGE_CACHE_SIZE:
        cache.clear()
    get = cache.get
    found = []
    for text in map(str.strip, texts):
        code = get(text)
        if code is None:
            lang, conf = detect(text)
            code = cache[text] = lang if lang is not None and conf >= min_conf else ""
        found.append(code)
    counts = Counter(found)
    s.languages.update(counts)
    s.language_checked += len(found)
    s.wrong_language += sum(n for code, n in counts.items() if code and code != params.language)


def _word_figures(s: GroupState, flat: list[str], lens: np.ndarray, params: AuditParams) -> None:
    """Type-token ratios, distinct n-grams, MinHash LSH band keys and loops, from the words of all captions."""
    m = len(lens)
    ids = word_ids(flat)
    owner = np.repeat(np.arange(m), lens)
    starts = np.r_[0, np.cumsum(lens)[:-1]]
    pos = np.arange(len(ids)) - starts[owner]
    s.ttr_sum += sum((_distinct_per_caption(ids, starts, lens) / lens).tolist())  # in caption order, as a loop adds
    grams = {1: ids}
    valid = {1: np.ones(len(ids), dtype=bool)}
    prev = ids
    for n in range(2, max(3, params.shingle) + 1):
        cur = np.zeros(len(ids), dtype=np.uint64)
        if len(ids) >= n:
            cur[:len(ids) - n + 1] = combine(prev[:len(ids) - n + 1], ids[n - 1:])
        grams[n], prev = cur, cur
        valid[n] = pos + n <= lens[owner]
    for n in (1, 2, 3):
        g = grams[n][valid[n]]
        s.ngrams[n - 1] = int(len(g))
        s.arrays[f"uniq{n}"] = unique(g)
    shingles, sh_owner = _shingles(grams, valid, lens, starts, owner, params.shingle)
    s.arrays["bands"] = minhash_signatures(shingles, sh_owner, m, params.num_perm, params.bands())[1]
    _loops(s, ids, owner, flat, params)


def _distinct_per_caption(ids: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Distinct words (by 64-bit hash) in each caption (its words: ids[start:start + len])."""
    from pipeline.audit import kernels

    return kernels.distinct_counts(ids, starts.astype(np.int64), lens.astype(np.int64))


def _shingles(grams: dict, valid: dict, lens: np.ndarray, starts: np.ndarray, owner: np.ndarray,
              k: int) -> tuple[np.ndarray, np.ndarray]:
    """MinHash shingles (upper 32 bits of word k-gram hashes) and their captions; a caption shorter than k
    words is one shingle (all its words)."""
    sh_mask = valid[k].copy()
    sh = np.where(valid[k], grams[k], 0)
    short = lens < k
    if short.any():
        sh_mask[starts[short]] = True
        for L in np.unique(lens[short]):
            sel = starts[short & (lens == L)]
            sh[sel] = grams[int(L)][sel]
    return sh[sh_mask] >> np.uint64(32), owner[sh_mask]


def _loops(s: GroupState, ids: np.ndarray, owner: np.ndarray, flat: list[str], params: AuditParams) -> None:
    """An n-gram repeated loop_repeats times back to back <=> a run of (repeats-1)*n equal pairs at distance n."""
    looped: dict[int, str] = {}
    for n in range(1, params.loop_max_n + 1):
        if len(ids) <= n:
            break
        eq = (ids[:-n] == ids[n:]) & (owner[:-n] == owner[n:])
        d = np.diff(np.r_[0, eq.astype(np.int8), 0])
        run_start, run_end = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
        for st in run_start[(run_end - run_start) >= (params.loop_repeats - 1) * n]:
            c = int(owner[st])
            if c not in looped:
                looped[c] = " ".join(flat[st:st + n])
    s.loops = len(looped)
    s.loop_examples.update(looped.values())


def _empty_arrays(params: AuditParams) -> dict[str, np.ndarray]:
    b, _ = params.bands()
    z = np.zeros(0, dtype=np.uint64)
    return {"uniq1": z, "uniq2": z, "uniq3": z, "dups": z, "bands": np.zeros((0, b), dtype=np.uint64)}


def _provenance_fields(prov: dict | None) -> tuple[str, str]:
    """(model, prompt) of a json.captions.<variant> entry as the recaption stage writes it:
    {"model": {"name", "id", "revision"}, "prompt": {"file", "sha256"}, ...} (plain strings accepted too)."""
    if not isinstance(prov, dict):
        return "(none recorded)", "(none recorded)"
    model = prov.get("model") or "(unknown)"
    if isinstance(model, dict):
        mid = model.get("id") or model.get("name") or "(unknown)"
        model = f"{mid}@{model['revision']}" if model.get("revision") else str(mid)
    prompt = prov.get("prompt") or prov.get("prompt_hash") or "(unknown)"
    if isinstance(prompt, dict):
        digest = str(prompt.get("sha256") or "")[:12]
        prompt = " ".join(x for x in (prompt.get("file"), f"sha256:{digest}" if digest else "") if x) or "(unknown)"
    return str(model), str(prompt)
