"""Per-group caption statistics as mergeable state: the audit's map (one shard) and reduce (all shards).

`scan_group(texts, ...)` turns one shard's captions of one group into a `GroupState`; `GroupAcc.add`
merges the shards' states of one group; `GroupAcc.figures()` computes every figure. A state travels between
processes as a safetensors blob (`to_bytes` / `from_bytes`): numpy arrays plus a JSON tensor, never pickle.

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
- refusals: REFUSAL_PATTERNS anywhere in the caption.
- wrong language: the `language_detector` of filters.language (fastText lid.176 by default, or lingua) says a
  language other than `language` with confidence >= language_min_confidence; lower confidence or no language
  is `undetermined`. Every non-empty caption is checked unless `language_sample` > 0.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from itertools import chain
from typing import Any, Iterable

import numpy as np

WORD_RE = re.compile(r"\w+(?:['’\-]\w+)*")
SPACE_RE = re.compile(r"\s+")
REFUSAL_PATTERNS = [
    r"\bi'?m sorry\b",
    r"\bi am sorry\b",
    r"\bi apologi[sz]e\b",
    r"\bi(?: can't| cannot| can not| am unable to|'m unable to| am not able to|'m not able to) "
    r"(?:help|assist|provide|describe|identify|see|view|process|comply|fulfil|fulfill|determine|access|caption)",
    r"\bas an ai\b",
    r"\bas a language model\b",
    r"\bi do(?:n't| not) (?:see|have) (?:an|any|the) image",
    r"\bno image (?:was|is|has been) (?:provided|attached|uploaded|shared)",
    r"\bunable to (?:view|see|process|describe|open) (?:the|this|an|any) image",
]
# every pattern starts with a word starting i, a, n or u: the lookahead lets the regex skip other positions
REFUSAL_RE = re.compile("(?=[iaun])(?:" + "|".join(f"(?:{p})" for p in REFUSAL_PATTERNS) + ")")
CLIP_SCALE = 10_000          # CLIP scores are kept as integer counts at 1e-4 resolution
HLL_P = 14                   # HyperLogLog precision: 2^14 registers, standard error 1.04/sqrt(2^14) = 0.81%
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MERSENNE = np.uint64((1 << 61) - 1)


def may_refuse(lowered: str) -> bool:
    """False when no REFUSAL_PATTERNS can match the lower-cased caption (’ as '): every match holds one of
    these (a test checks each pattern); six substring searches instead of the regex for almost every caption."""
    return "i " in lowered or "i'" in lowered or "m sorry" in lowered or "as a" in lowered \
        or "no image" in lowered or "unable to" in lowered


@dataclass
class AuditParams:
    """Everything that decides the figures (hashed into the audit's config)."""

    opening_words: int = 3
    top_k: int = 10
    openings_capacity: int = 10_000
    near_threshold: float = 0.8
    num_perm: int = 64
    shingle: int = 3
    loop_repeats: int = 3
    loop_max_n: int = 8
    distinct_cap: int = 1 << 20
    language: str = "en"
    language_min_confidence: float = 0.5
    language_detector: str = "fasttext"  # filters.language.DETECTORS
    language_sample: int = 0          # 0: every caption; N: the first N non-empty captions per shard and group
    token_limit: int | None = None

    def bands(self) -> tuple[int, int]:
        """(bands, rows) for the LSH, as datasketch's MinHashLSH chooses them."""
        return lsh_bands(self.near_threshold, self.num_perm)


_BANDS: dict[tuple[float, int], tuple[int, int]] = {}


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """datasketch's optimal (bands, rows) for MinHashLSH (it integrates with scipy: the driver computes it once
    and passes it to the workers through `remember_bands`, so they never import either)."""
    if (threshold, num_perm) not in _BANDS:
        from datasketch.lsh import _optimal_param

        _BANDS[(threshold, num_perm)] = tuple(int(x) for x in _optimal_param(threshold, num_perm, 0.5, 0.5))
    return _BANDS[(threshold, num_perm)]


def remember_bands(threshold: float, num_perm: int, bands: tuple[int, int]) -> None:
    """Record what `lsh_bands(threshold, num_perm)` returned in another process."""
    _BANDS[(threshold, num_perm)] = (int(bands[0]), int(bands[1]))


# ----------------------------------------------------------------------------------------------- hashing
def _splitmix(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.uint64, copy=True)
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


_WORD_HASH: dict[str, int] = {}    # per process: word -> word_hash(word)
_WORD_HASH_SIZE = 2_000_000
_LANGUAGE_CACHE: dict[Any, dict[str, str]] = {}
_LANGUAGE_CACHE_SIZE = 100_000


def _language_cache(key) -> dict[str, str]:
    """Per-process memo of the language code ("" below the confidence) by stripped caption, per (detector,
    confidence): the detector is a pure function of the text, so a repeated caption - duplicates, stock
    refusals - costs one detection; the figures are unchanged."""
    if key not in _LANGUAGE_CACHE and len(_LANGUAGE_CACHE) >= 4:
        _LANGUAGE_CACHE.clear()
    return _LANGUAGE_CACHE.setdefault(key, {})


def _blake64(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=8).digest()


def word_hash(word: str) -> int:
    """A stable 64-bit hash of a word (the same in every process; Python's hash() is salted)."""
    return int.from_bytes(_blake64(word.encode("utf-8")), "little")


def word_ids(words: list[str]) -> np.ndarray:
    """word_hash of every word as uint64; each distinct word is hashed once per process (a table of up to
    _WORD_HASH_SIZE words, emptied when full), the rest is one C-level lookup per word."""
    table = _WORD_HASH
    new = set(words).difference(table)
    if len(table) + len(new) > _WORD_HASH_SIZE:
        table.clear()
        new = set(words)
    for w in new:
        table[w] = word_hash(w)
    return np.fromiter(map(table.__getitem__, words), dtype=np.uint64, count=len(words))


def text_hash(text: str) -> int:
    return int.from_bytes(_blake64(text.encode("utf-8")), "little")


def text_hashes(texts: list[str]) -> np.ndarray:
    """text_hash of each text, as one uint64 array."""
    raw = b"".join([_blake64(t.encode("utf-8")) for t in texts])
    return np.frombuffer(raw, dtype="<u8").astype(np.uint64)


def unique(x: np.ndarray) -> np.ndarray:
    """np.unique(x) of a 1-D array by one sort: numpy 2.4's np.unique takes a hash path that is 4-8x slower
    on uint64 hashes (and 40x on a concatenation of sorted arrays, which a sort merges as runs)."""
    s = np.sort(x)
    if len(s) < 2:
        return s
    keep = np.empty(len(s), dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


def combine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Order-dependent mix of two uint64 hash arrays (n-grams, LSH bands)."""
    with np.errstate(over="ignore"):
        return _splitmix(a * GOLDEN + b)


# ----------------------------------------------------------------------------------------------- sketches
def _clz64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64, copy=True)
    n = np.zeros(x.shape, dtype=np.int64)
    for shift in (32, 16, 8, 4, 2, 1):
        small = x < (np.uint64(1) << np.uint64(64 - shift))
        n += small * shift
        x = np.where(small, x << np.uint64(shift), x)
    return n + (x == 0)


def hll_registers(hashes: np.ndarray, p: int = HLL_P) -> np.ndarray:
    reg = np.zeros(1 << p, dtype=np.uint8)
    if len(hashes):
        h = _splitmix(hashes)  # re-mix: n-gram hashes are already mixed, but word hashes feed several orders
        idx = (h >> np.uint64(64 - p)).astype(np.int64)
        w = (h << np.uint64(p)) | (np.uint64(1) << np.uint64(p - 1))
        rho = (_clz64(w) + 1).astype(np.uint8)
        np.maximum.at(reg, idx, rho)
    return reg


def hll_estimate(reg: np.ndarray) -> float:
    m = len(reg)
    alpha = 0.7213 / (1 + 1.079 / m)
    est = alpha * m * m / float(np.sum(np.ldexp(1.0, -reg.astype(np.int64))))
    zeros = int(np.count_nonzero(reg == 0))
    if est <= 2.5 * m and zeros:
        est = m * math.log(m / zeros)
    return est


class Distinct:
    """Distinct 64-bit hashes: exact (sorted unique array) up to `cap`, then a HyperLogLog estimate.

    The HLL registers are built only when the exact set outgrows `cap`, from that set (registers are a max
    over distinct hashes, so this equals feeding every batch as it came), then updated batch by batch."""

    def __init__(self, cap: int | None):
        self.cap = cap
        self.exact: np.ndarray | None = np.zeros(0, dtype=np.uint64)
        self.pending: list[np.ndarray] = []
        self.pending_n = 0
        self.reg: np.ndarray | None = None

    def add(self, unique_hashes: np.ndarray) -> None:
        if self.exact is None:
            np.maximum(self.reg, hll_registers(unique_hashes), out=self.reg)
            return
        self.pending.append(unique_hashes)
        self.pending_n += len(unique_hashes)
        if self.pending_n > max(len(self.exact), 1 << 16):
            self._consolidate()

    def _consolidate(self) -> None:
        if self.exact is None or not self.pending:
            return
        self.exact = unique(np.concatenate([self.exact, *self.pending]))
        self.pending, self.pending_n = [], 0
        if self.cap is not None and len(self.exact) > self.cap:
            self.reg = hll_registers(self.exact)
            self.exact = None

    def count(self) -> tuple[float, bool]:
        """(distinct count, exact?)."""
        self._consolidate()
        if self.exact is not None:
            return float(len(self.exact)), True
        return hll_estimate(self.reg), False


class IntHist:
    """An integer histogram summed from many small ones (the shards' CLIP score counts) in numpy, one sort per
    doubling (Counter.update is a Python loop per key); keys beyond int64 are summed in a Counter."""

    def __init__(self):
        self.keys = np.zeros(0, dtype=np.int64)
        self.counts = np.zeros(0, dtype=np.int64)
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending_n = 0
        self.huge: Counter = Counter()

    def add(self, hist: dict[int, int]) -> None:
        try:
            keys = np.fromiter(hist.keys(), dtype=np.int64, count=len(hist))
        except OverflowError:
            self.huge.update(hist)
            return
        self.pending.append((keys, np.fromiter(hist.values(), dtype=np.int64, count=len(hist))))
        self.pending_n += len(hist)
        if self.pending_n > max(len(self.keys), 1 << 16):
            self._consolidate()

    def _consolidate(self) -> None:
        if not self.pending:
            return
        keys = np.concatenate([self.keys, *(k for k, _ in self.pending)])
        counts = np.concatenate([self.counts, *(c for _, c in self.pending)])
        order = np.argsort(keys, kind="stable")
        keys, counts = keys[order], counts[order]
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        self.keys, self.counts = keys[starts], np.add.reduceat(counts, starts)
        self.pending, self.pending_n = [], 0

    def counter(self) -> Counter:
        self._consolidate()
        out = Counter(dict(zip(self.keys.tolist(), self.counts.tolist())))
        out.update(self.huge)
        return out


class TopCounts:
    """Misra-Gries summary: exact while at most `capacity` distinct items, then counts are lower bounds
    off by at most `error` (mergeable: Agarwal et al., 2012)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.counts: Counter = Counter()
        self.error = 0

    def update(self, counts: dict[str, int], error: int = 0) -> None:
        self.counts.update(counts)
        self.error += error
        if len(self.counts) > self.capacity:
            cut = sorted(self.counts.values(), reverse=True)[self.capacity]
            self.counts = Counter({k: v - cut for k, v in self.counts.items() if v > cut})
            self.error += cut

    def top(self, k: int) -> list[tuple[str, int]]:
        return sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


# ----------------------------------------------------------------------------------------------- minhash
_PERMS: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def permutations(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's own (a, b) for its legacy scheme, drawn as `MinHash._init_permutations` draws them (a test
    compares), so signatures equal datasketch.MinHash's; without importing datasketch (and scipy) per worker."""
    if (num_perm, seed) not in _PERMS:
        gen = np.random.RandomState(seed)
        pairs = [(gen.randint(1, _MERSENNE, dtype=np.uint64), gen.randint(0, _MERSENNE, dtype=np.uint64))
                 for _ in range(num_perm)]
        a, b = np.array(pairs, dtype=np.uint64).T
        _PERMS[(num_perm, seed)] = (np.ascontiguousarray(a), np.ascontiguousarray(b))
    return _PERMS[(num_perm, seed)]


def minhash_signatures(shingles: np.ndarray, owner: np.ndarray, n_owners: int, num_perm: int,
                       bands: tuple[int, int] = (0, 1)) -> tuple[np.ndarray, np.ndarray]:
    """(signatures n_owners x num_perm, LSH band keys n_owners x bands[0]) of 32-bit shingle hashes grouped by
    `owner` (sorted, every owner present). Signatures equal datasketch.MinHash(scheme="legacy").update_batch's:
    per permutation (a, b), min over the caption's shingles of ((a * h + b) mod 2^64 mod (2^61 - 1)) &
    (2^32 - 1); band keys are `band_keys` of them. One compiled loop (kernels.minhash_bands)."""
    from pipeline.audit import kernels

    a, b = permutations(num_perm)
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]]) if len(owner) else np.zeros(0, dtype=np.int64)
    sig = np.empty((n_owners, num_perm), dtype=np.uint64)
    keys = np.empty((n_owners, bands[0]), dtype=np.uint64)
    kernels.minhash_bands(np.ascontiguousarray(shingles, dtype=np.uint64), starts, a, b, bands[1], sig, keys)
    return sig, keys


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


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    out = np.zeros((len(sig), bands), dtype=np.uint64)
    for j in range(bands):
        h = np.full(len(sig), np.uint64(j + 1), dtype=np.uint64)
        for r in range(rows):
            h = combine(h, sig[:, j * rows + r])
        out[:, j] = h
    return out


def near_duplicate_clusters(keys: np.ndarray) -> int:
    """Connected clusters of captions linked by a shared LSH bucket in any band."""
    n = len(keys)
    if n == 0:
        return 0
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    src, dst = [], []
    for j in range(keys.shape[1]):
        k = keys[:, j]
        s = np.sort(k)                              # a sort of the values: ~5x cheaper than argsort of them all
        shared = s[1:][s[1:] == s[:-1]]             # buckets of 2+ captions
        if not len(shared):
            continue
        idx = np.flatnonzero(np.isin(k, shared))
        order = idx[np.argsort(k[idx], kind="stable")]
        same = np.flatnonzero(k[order[1:]] == k[order[:-1]])
        src.append(order[same])
        dst.append(order[same + 1])
    if not src:
        return n
    s, d = np.concatenate(src), np.concatenate(dst)
    graph = coo_matrix((np.ones(len(s), dtype=np.int8), (s, d)), shape=(n, n))
    return int(connected_components(graph, directed=False)[0])


# ----------------------------------------------------------------------------------------------- state
_INT_HISTS = ("words", "tokens")   # int -> captions Counters, stored as [keys, counts] (JSON keys are strings)
_STR_COUNTERS = ("openings", "loop_examples", "refusal_examples", "languages", "models", "prompts")


def _pairs(c: Counter) -> list[list[int]]:
    return [list(c.keys()), list(c.values())]


def _from_pairs(pairs: list[list[int]]) -> Counter:
    return Counter(dict(zip(*pairs)))


@dataclass
class GroupState:
    """One group's mergeable state. Scalars and counters go to JSON, hash arrays to tensors."""

    n: int = 0
    empty: int = 0
    words: Counter = field(default_factory=Counter)           # word count -> captions
    tokens: Counter | None = None                             # token count -> captions (None: no tokenizer)
    over_limit: int = 0
    ttr_sum: float = 0.0
    ngrams: list = field(default_factory=lambda: [0, 0, 0])  # all 1/2/3-grams
    openings: Counter = field(default_factory=Counter)
    openings_error: int = 0
    loops: int = 0
    loop_examples: Counter = field(default_factory=Counter)
    refusals: int = 0
    refusal_examples: Counter = field(default_factory=Counter)
    languages: Counter = field(default_factory=Counter)       # detected code ("" = undetermined) -> captions
    language_checked: int = 0
    wrong_language: int = 0
    clip: dict = field(default_factory=dict)                  # score name -> Counter(round(score*1e4) -> n)
    models: Counter = field(default_factory=Counter)
    prompts: Counter = field(default_factory=Counter)
    arrays: dict = field(default_factory=dict)                # uniq1/2/3, dups (unique uint64), bands (n x b)

    # ---- serialisation (no pickle)
    def meta(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("arrays", "clip")}
        for name in _INT_HISTS:
            d[name] = None if d[name] is None else _pairs(d[name])
        for name in _STR_COUNTERS:
            d[name] = dict(d[name])
        d["clip"] = {name: _pairs(c) for name, c in self.clip.items()}
        return d

    @classmethod
    def from_meta(cls, d: dict[str, Any], arrays: dict[str, np.ndarray]) -> "GroupState":
        s = cls(**{k: v for k, v in d.items() if k not in (*_INT_HISTS, *_STR_COUNTERS, "clip")})
        for name in _INT_HISTS:
            setattr(s, name, None if d[name] is None else _from_pairs(d[name]))
        for name in _STR_COUNTERS:
            setattr(s, name, Counter(d[name]))
        s.clip = {name: _from_pairs(c) for name, c in d["clip"].items()}
        s.arrays = arrays
        return s


def to_bytes(groups: dict[str, GroupState], extra: dict[str, Any]) -> bytes:
    """One shard's partial state, {group id: GroupState} plus JSON `extra`, as a safetensors blob: the hash
    arrays as tensors, the rest as UTF-8 JSON in the uint8 tensor `meta`."""
    from safetensors.numpy import save

    arrays: dict[str, np.ndarray] = {}
    meta = {"groups": {}, "extra": extra}
    for i, (gid, g) in enumerate(groups.items()):
        meta["groups"][gid] = {"slot": i, "state": g.meta()}
        for name, arr in g.arrays.items():
            arrays[f"g{i}_{name}"] = np.ascontiguousarray(arr)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    return save(arrays)


def from_bytes(data: bytes) -> tuple[dict[str, GroupState], dict[str, Any]]:
    """The inverse of `to_bytes` (the safetensors library checks the blob)."""
    from safetensors.numpy import load

    arrays = load(data)
    meta = json.loads(arrays.pop("meta").tobytes().decode("utf-8"))
    out = {}
    for gid, g in meta["groups"].items():
        prefix = f"g{g['slot']}_"
        out[gid] = GroupState.from_meta(g["state"], {k[len(prefix):]: v for k, v in arrays.items()
                                                     if k.startswith(prefix)})
    return out, meta["extra"]


# ----------------------------------------------------------------------------------------------- map
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
    maybe = [t for t in [t.replace("’", "'") for t in lowered] if may_refuse(t)]
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


# ----------------------------------------------------------------------------------------------- reduce
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
