"""The audit's per-caption numeric loops, compiled with numba (a loop per caption and permutation that numpy
can only express as dozens of whole-array passes): MinHash signatures with their LSH band keys, and distinct
words per caption. Each equals the numpy/datasketch definition in `stats` (tests/test_audit_runner.py).

Compiled once per machine (~5 s; `cache=True`: numba keeps the machine code beside this file, or in
NUMBA_CACHE_DIR), then loaded by each process on its first call (~0.8 s with numba's import, stated apart by the
audit as `kernel_load`).
All arithmetic is on uint64 and wraps modulo 2^64, as numpy's does: every constant is a np.uint64 (numba
would turn uint64 mixed with a Python int into float64).
"""
from __future__ import annotations

import numpy as np
from numba import njit

_MERSENNE = np.uint64((1 << 61) - 1)
_MAX32 = np.uint64((1 << 32) - 1)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S61, _S30, _S27, _S31, _ONE = np.uint64(61), np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(1)


@njit(cache=True, nogil=True)
def _combine(a, b):
    """sketches.combine of two uint64 values: splitmix64 of a * GOLDEN + b."""
    z = a * _GOLDEN + b
    z ^= z >> _S30
    z *= _MIX1
    z ^= z >> _S27
    z *= _MIX2
    z ^= z >> _S31
    return z


@njit(cache=True, nogil=True)
def minhash_bands(h, starts, a, b, rows, sig, keys):
    """For caption c (shingles h[starts[c]:starts[c + 1]], every caption has one): sig[c, j] = min over its
    shingles of ((a[j] * x + b[j]) mod 2^64 mod (2^61 - 1)) & (2^32 - 1), datasketch's legacy MinHash; then
    keys[c, band] = combine over the band's `rows` signature values, starting from band + 1 (sketches.band_keys)."""
    n, k, total = starts.shape[0], a.shape[0], h.shape[0]
    for c in range(n):
        hi = starts[c + 1] if c + 1 < n else total
        row = sig[c]
        for j in range(k):
            row[j] = _MAX32
        for i in range(starts[c], hi):
            x = h[i]
            for j in range(k):
                y = a[j] * x + b[j]
                z = (y & _MERSENNE) + (y >> _S61)     # y mod p, p = 2^61 - 1, up to one p too many ...
                z += (z + _ONE) >> _S61               # ... which mod 2^32 is one more
                v = z & _MAX32
                if v < row[j]:
                    row[j] = v
        for band in range(keys.shape[1]):
            key = np.uint64(band + 1)
            for r in range(rows):
                key = _combine(key, row[band * rows + r])
            keys[c, band] = key


@njit(cache=True, nogil=True)
def distinct_counts(ids, starts, lens):
    """Distinct values of ids[starts[c]:starts[c] + lens[c]] for every caption c."""
    out = np.zeros(starts.shape[0], dtype=np.int64)
    for c in range(starts.shape[0]):
        words = np.sort(ids[starts[c]:starts[c] + lens[c]])
        count = 1 if lens[c] else 0
        for i in range(1, words.shape[0]):
            if words[i] != words[i - 1]:
                count += 1
        out[c] = count
    return out
