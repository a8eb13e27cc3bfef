"""Classification metrics for the general-capability tasks (docs/FORMULAS.md §R8), numpy only.

Conventions follow sklearn's ``accuracy_score``, ``f1_score(average="weighted")`` and
``matthews_corrcoef``: the label set is the union of labels in ``y_true`` and ``y_pred`` (so an
invalid prediction −1 is its own class); per-class F1 with 0 where precision + recall = 0;
weights = true-class support; MCC = 0 when its denominator is 0.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["accuracy", "confusion", "matthews_corrcoef", "weighted_f1"]


def _arrays(y_true: Sequence[int], y_pred: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.shape != p.shape or t.ndim != 1:
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} must be equal-length 1-D sequences")
    if t.size == 0:
        raise ValueError("no labels")
    return t, p


def confusion(y_true: Sequence[int], y_pred: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, C) with C[i, j] = #(true = labels[i], pred = labels[j])."""
    t, p = _arrays(y_true, y_pred)
    labels = np.unique(np.concatenate([t, p]))
    ti = np.searchsorted(labels, t)
    pi = np.searchsorted(labels, p)
    c = np.zeros((labels.size, labels.size), dtype=np.int64)
    np.add.at(c, (ti, pi), 1)
    return labels, c


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    t, p = _arrays(y_true, y_pred)
    return float((t == p).mean())


def weighted_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    _, c = confusion(y_true, y_pred)
    tp = np.diag(c).astype(np.float64)
    support = c.sum(1).astype(np.float64)
    predicted = c.sum(0).astype(np.float64)
    denom = support + predicted  # F1 = 2 tp / (2 tp + fp + fn) = 2 tp / (support + predicted)
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float((f1 * support).sum() / support.sum())


def matthews_corrcoef(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Multi-class MCC (Gorodkin's R_K), as sklearn computes it."""
    _, c = confusion(y_true, y_pred)
    c = c.astype(np.float64)
    t_k, p_k = c.sum(1), c.sum(0)
    s, correct = c.sum(), np.trace(c)
    cov_ytyp = correct * s - t_k @ p_k
    cov_ypyp = s * s - p_k @ p_k
    cov_ytyt = s * s - t_k @ t_k
    if cov_ypyp * cov_ytyt == 0:
        return 0.0
    return float(cov_ytyp / np.sqrt(cov_ytyt * cov_ypyp))
