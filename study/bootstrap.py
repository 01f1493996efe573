"""A bootstrap interval for FID: resample the real and the generated feature sets (with replacement, each at
its own size) and take the percentiles of the FIDs of the resamples. It is the FID's sampling noise from the
finite feature sets alone, at one seed; the seed band of the report is the run-to-run noise."""
from __future__ import annotations

import numpy as np

from trainer.scores import fid_from_features


def fid_interval(real: np.ndarray, gen: np.ndarray, resamples: int = 200, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """(low, high): the central `level` percentile interval of FID over `resamples` bootstrap draws."""
    rng = np.random.default_rng(seed)
    fids = [fid_from_features(real[rng.integers(0, len(real), len(real))],
                              gen[rng.integers(0, len(gen), len(gen))]) for _ in range(resamples)]
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(fids, [tail, 100 - tail])
    return float(low), float(high)
