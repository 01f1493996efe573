"""The audit's hashes and mergeable sketches, in numpy: stable 64-bit word and text hashes, exact-then-HyperLogLog
distinct counts (`Distinct`), integer histograms (`IntHist`), a Misra-Gries top-k (`TopCounts`), and MinHash
signatures with their LSH band keys and the clusters they link (datasketch's legacy scheme, without importing
datasketch or scipy in a worker)."""
from __future__ import annotations

import hashlib
import math
from collections import Counter

import numpy as np


HLL_P = 14                   # HyperLogLog precision: 2^14 registers, standard error 1.04/sqrt(2^14) = 0.81%
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MERSENNE = np.uint64((1 << 61) - 1)


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
