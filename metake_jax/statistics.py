"""Paired statistics of docs/FORMULAS.md §11: the per-case paired bootstrap interval and its verdict.

Kept apart from ``analysis`` (which runs edits) so that reports can use it from the lowest layer.
"""
from __future__ import annotations

import numpy as np


def paired_bootstrap(a: np.ndarray, b: np.ndarray, *, n_resamples: int = 2000, confidence: float = 0.95,
                     seed: int = 0) -> tuple[float, float, float]:
    """Mean per-case difference ``mean(a − b)`` and its paired bootstrap interval (docs/FORMULAS.md §11).

    a, b: (n_pairs,) per-case outcomes of two methods on the same (data seed, case) pairs, in the
    same order.  Cases are resampled with replacement (``scipy.stats.bootstrap(paired=True)``,
    percentile interval, ``n_resamples`` ≥ 1000 per §11).  Returns ``(diff, lo, hi)`` in the units of
    the outcomes; when every difference is the same the interval is that value.  Raises ValueError
    for mismatched / empty inputs or fewer than 1000 resamples.
    """
    from scipy import stats

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_bootstrap: need two equal non-empty 1-D arrays, got {a.shape}, {b.shape}")
    if n_resamples < 1000:
        raise ValueError(f"paired_bootstrap: docs/FORMULAS.md §11 asks for >= 1000 resamples, got {n_resamples}")
    d = a - b
    diff = float(d.mean())
    if np.ptp(d) == 0.0:  # degenerate: every resample gives the same mean
        return diff, diff, diff
    res = stats.bootstrap((a, b), lambda x, y, axis: np.mean(x - y, axis=axis), paired=True, vectorized=True,
                          n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                          random_state=np.random.default_rng(seed))
    return diff, float(res.confidence_interval.low), float(res.confidence_interval.high)


NOISE = 1e-6  # |difference| below this (metric units) is float round-off, never a finding


def verdict(lo: float, hi: float) -> str:
    """"no difference" when the interval contains 0 (docs/FORMULAS.md §11), else "better (+)" / "worse (−)".

    For metrics where higher is better (every benchmark metric here).
    """
    if lo <= 0.0 <= hi or max(abs(lo), abs(hi)) <= NOISE:  # contains 0, or float round-off only
        return "no difference"
    return "better (+)" if lo > 0 else "worse (−)"
