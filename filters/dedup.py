"""Dedup: exact (full sha256), perceptual (pHash, Hamming distance) and semantic (CLIP image embeddings,
cosine similarity). Each finds pairs of near-equal samples; groups are the connected components of those
pairs (union-find), and `keepers` picks one member per group: the largest (width x height), then the highest
CLIP score, then the lowest shard, then the lowest key. Nothing here knows about shards as files: callers pass
arrays.

Perceptual, `hamming_pairs`: multi-index hashing. The 64-bit pHash is cut into 4 blocks of 16 bits; two hashes
within distance t agree within distance floor(t/4) on at least one block (pigeonhole), so for each block and
each of the sum_{i<=floor(t/4)} C(16, i) bit masks (17 for t<=7, 137 for t<=11) the hashes are looked up in
that block's sorted table, and candidates are verified with a 64-bit popcount. Identical hashes are merged
first, so a flood of one hash (blank images) costs O(N), not O(N^2). Exact (finds every pair within t);
time O(M log M + candidates) with M unique hashes, memory O(N + chunk).

Semantic, `semantic_pairs`: clustering, as SemDeDup does. Spherical k-means with k = ceil(sqrt(N)) centroids
(a few Lloyd iterations over row blocks), each embedding assigned to its `probes` nearest centroids (2 by
default, so pairs near a cluster border are still compared), then exact cosine similarity within each
cluster, one row block at a time. Never an N x N matrix: peak memory O(N*d + B*max(k, c)) for block size B
and largest cluster c <= N (linear in N); time O(N*k*d*iters + sum over clusters of c^2*d) ~ O(N^1.5 * d)
for balanced clusters. Approximate: a pair whose members share none of their `probes` nearest centroids
is missed (rare for near-duplicates, whose embeddings are almost equal).
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np

REASONS = {
    "duplicate_perceptual": "pHash within --phash-distance bits of the kept key named in detail (resized, "
                            "recompressed or lightly edited copy)",
    "duplicate_semantic": "CLIP image embedding cosine >= --semantic-threshold to a member of the group whose "
                          "kept key is named in detail",
}


# ------------------------------------------------------------------------------------------- groups
class UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, i: int) -> int:
        p = self.parent
        root = i
        while p[root] != root:
            root = p[root]
        while p[i] != root:
            p[i], i = root, p[i]
        return int(root)

    def union_pairs(self, a: np.ndarray, b: np.ndarray) -> None:
        for i, j in zip(a.tolist(), b.tolist()):
            ri, rj = self.find(i), self.find(j)
            if ri != rj:
                if ri < rj:
                    self.parent[rj] = ri
                else:
                    self.parent[ri] = rj

    def labels(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def components(n: int, pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Connected-component label (the smallest member index) for each of n items."""
    uf = UnionFind(n)
    for a, b in pairs:
        uf.union_pairs(np.asarray(a), np.asarray(b))
    return uf.labels()


def keepers(labels: np.ndarray, pixels: np.ndarray, clip: np.ndarray | None, shard: np.ndarray,
            keys: list[str]) -> np.ndarray:
    """Index of each item's kept group member: largest, then highest CLIP score, then lowest shard and key."""
    n = len(labels)
    clip_col = np.zeros(n) if clip is None else np.nan_to_num(np.asarray(clip, dtype=np.float64), nan=-np.inf)
    key_rank = np.empty(n, dtype=np.int64)
    key_rank[np.argsort(np.asarray(keys, dtype=object), kind="stable")] = np.arange(n)
    # lexsort: last key is primary. Group first, then the keeper order.
    order = np.lexsort((key_rank, np.asarray(shard), -clip_col, -np.asarray(pixels, dtype=np.float64), labels))
    first = np.ones(n, dtype=bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    keeper_of_label = dict(zip(labels[order][first].tolist(), order[first].tolist()))
    return np.array([keeper_of_label[lab] for lab in labels.tolist()], dtype=np.int64)


# ------------------------------------------------------------------------------------------- exact
def exact_pairs(digests: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (first occurrence, later occurrence) of equal digests."""
    first: dict[str, int] = {}
    a, b = [], []
    for i, d in enumerate(digests):
        if not d:
            continue
        j = first.setdefault(d, i)
        if j != i:
            a.append(j)
            b.append(i)
    return np.array(a, dtype=np.int64), np.array(b, dtype=np.int64)


# ------------------------------------------------------------------------------------------- perceptual
def phash(image, hash_size: int = 8) -> int:
    """64-bit perceptual hash (imagehash.phash) of a PIL image, as an unsigned int."""
    import imagehash

    bits = imagehash.phash(image, hash_size=hash_size).hash.flatten()
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return value


def to_signed(value: int) -> int:
    """Unsigned 64-bit -> signed int64 (for parquet)."""
    return value - (1 << 64) if value >= (1 << 63) else value


def _masks(bits: int, radius: int) -> np.ndarray:
    from itertools import combinations

    out = [0]
    for r in range(1, radius + 1):
        for combo in combinations(range(bits), r):
            out.append(sum(1 << c for c in combo))
    return np.array(out, dtype=np.uint64)


def hamming_pairs(hashes: np.ndarray, max_distance: int, chunk: int = 1 << 20):
    """Yield (i, j) index arrays of every pair with Hamming distance <= max_distance (64-bit hashes)."""
    h = np.asarray(hashes).astype(np.int64).view(np.uint64)
    if len(h) < 2:
        return
    uniq, inverse = np.unique(h, return_inverse=True)
    # items with identical hashes: chain them to their first occurrence
    order = np.argsort(inverse, kind="stable")
    inv_sorted = inverse[order]
    same = inv_sorted[1:] == inv_sorted[:-1]
    if same.any():
        starts = np.r_[0, np.flatnonzero(~same) + 1]
        head = np.repeat(order[starts], np.diff(np.r_[starts, len(order)]))
        dup = head != order
        yield head[dup], order[dup]
    if max_distance <= 0 or len(uniq) < 2:
        return
    rep = np.empty(len(uniq), dtype=np.int64)
    rep[inverse[::-1]] = np.arange(len(h))[::-1]  # first item of each unique hash
    radius = max_distance // 4
    masks = _masks(16, radius)
    m = len(uniq)
    for block in range(4):
        shift = np.uint64(16 * block)
        vals = (uniq >> shift) & np.uint64(0xFFFF)
        srt = np.argsort(vals, kind="stable")
        sorted_vals = vals[srt]
        for mask in masks:
            query = vals ^ mask
            lo = np.searchsorted(sorted_vals, query, "left")
            hi = np.searchsorted(sorted_vals, query, "right")
            counts = hi - lo
            # expand candidate ranges in chunks of at most `chunk` pairs
            start = 0
            cum = np.cumsum(counts)
            while start < m:
                base = cum[start - 1] if start else 0
                stop = int(np.searchsorted(cum, base + chunk, "right"))
                stop = max(stop, start + 1)
                c = counts[start:stop]
                total = int(c.sum())
                if total:
                    qi = np.repeat(np.arange(start, stop), c)
                    offs = np.arange(total) - np.repeat(np.cumsum(c) - c, c)
                    cj = srt[np.repeat(lo[start:stop], c) + offs]
                    keep = cj > qi
                    qi, cj = qi[keep], cj[keep]
                    dist = np.bitwise_count(uniq[qi] ^ uniq[cj])
                    ok = dist <= max_distance
                    if ok.any():
                        yield rep[qi[ok]], rep[cj[ok]]
                start = stop


# ------------------------------------------------------------------------------------------- semantic
def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _top_centroids(emb: np.ndarray, centroids: np.ndarray, probes: int, block: int) -> np.ndarray:
    n = len(emb)
    out = np.empty((n, probes), dtype=np.int64)
    for s in range(0, n, block):
        sims = emb[s:s + block] @ centroids.T
        if probes == 1:
            out[s:s + block, 0] = sims.argmax(1)
        else:
            part = np.argpartition(-sims, probes - 1, axis=1)[:, :probes]
            out[s:s + block] = part
    return out


def spherical_kmeans(emb: np.ndarray, k: int, iters: int = 8, seed: int = 0, block: int = 4096) -> np.ndarray:
    """k unit centroids by Lloyd iterations over row blocks (memory O(k*d + block*k))."""
    rng = np.random.default_rng(seed)
    n, d = emb.shape
    centroids = emb[rng.choice(n, size=k, replace=False)].copy()
    for _ in range(iters):
        assign = _top_centroids(emb, centroids, 1, block)[:, 0]
        sums = np.zeros((k, d), dtype=np.float64)
        np.add.at(sums, assign, emb)
        empty = np.flatnonzero(np.bincount(assign, minlength=k) == 0)
        if len(empty):  # re-seed empty clusters with random points
            sums[empty] = emb[rng.choice(n, size=len(empty), replace=False)]
        centroids = _normalise(sums)
    return centroids


def semantic_pairs(embeddings: np.ndarray, threshold: float, probes: int = 2, block: int = 1024,
                   n_clusters: int | None = None, seed: int = 0):
    """Yield (i, j) index arrays of pairs with cosine >= threshold (approximate: see module doc)."""
    emb = _normalise(embeddings)
    n = len(emb)
    if n < 2:
        return
    k = n_clusters or max(1, math.ceil(math.sqrt(n)))
    if n <= block or k == 1:
        assign = np.zeros((n, 1), dtype=np.int64)
    else:
        centroids = spherical_kmeans(emb, k, seed=seed)
        assign = _top_centroids(emb, centroids, min(probes, k), block)
    flat_c = assign.ravel()
    flat_i = np.repeat(np.arange(n), assign.shape[1])
    order = np.argsort(flat_c, kind="stable")
    flat_c, flat_i = flat_c[order], flat_i[order]
    bounds = np.flatnonzero(np.r_[True, flat_c[1:] != flat_c[:-1], True])
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        members = np.sort(flat_i[lo:hi])
        if len(members) < 2:
            continue
        m_emb = emb[members]
        for s in range(0, len(members), block):
            rows = m_emb[s:s + block]
            sims = rows @ m_emb.T
            r, c = np.nonzero(sims >= threshold)
            keep = c > r + s
            if keep.any():
                yield members[r[keep] + s], members[c[keep]]
