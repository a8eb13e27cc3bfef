"""The paper's analyses (docs/FORMULAS.md §10) and the paired statistics of §11, as pure functions.

Named dimensions: ``d_model`` (residual width d), ``d_key`` (FFN key width d_k), ``n_req``
(requests of a batch / stream), ``n_query`` (factual queries of the hidden-state analysis).
Requests are **columns** of key / residual matrices (docs/FORMULAS.md §1).

* Association and realized coefficient (§5, §10 Fig. 4): :func:`association_beta`,
  :func:`realized_gamma`, :func:`measure_write` (one batch: β before the write, γ after it) and
  :func:`measure_stream` (a sequential stream of batches), :func:`quantile_bins`, :func:`attenuation`.
* KL sweep (§10 Fig. 5): :func:`extreme_groups`, :func:`best_on_grid`.
* Hidden-state shift (§10 Fig. 7): :func:`final_hidden`, :func:`relative_shift`, :func:`rbf_mmd2`,
  :func:`pca_2d`.
* Paired statistics (§11): :func:`paired_bootstrap`, :func:`verdict`.

The launcher is ``launch/analyze.py``; the run-directory table is ``metake_jax.report.paired_table``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from functools import partial
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metake_jax.editors import Editor, LayerStats
from metake_jax.batch import EditBatch
from metake_jax.editor import EditConfig, EditState, edit_batch, measure_after, measure_before, write_targets
from metake_jax.write import association_beta, realized_gamma  # noqa: F401  (re-exported)
from metake_jax.tokens import encode, pad_id, pad_right
from models.config import ModelConfig
from models.interface import forward

Array = jax.Array

__all__ = [
    "StreamMeasure", "WriteMeasure", "association_beta", "attenuation", "best_on_grid", "extreme_groups",
    "final_hidden", "measure_stream", "measure_write", "paired_bootstrap", "pca_2d", "quantile_bins",
    "rbf_mmd2", "realized_gamma", "relative_shift", "solve_scope", "verdict",
]

_HI = jax.lax.Precision.HIGHEST


# ============================================================================ association / realized γ (§5)


def solve_scope(editor: Editor) -> contextlib.AbstractContextManager:
    """64-bit mode around traced editor calls when the editor solves in float64 (MEMIT)."""
    return editor.scope()


def attenuation(beta: np.ndarray) -> np.ndarray:
    """Prop. 1 attenuation ``α = β / (1 + β)`` (docs/FORMULAS.md §5); same shape as ``beta``."""
    b = np.asarray(beta, np.float64)
    return b / (1.0 + b)


class WriteMeasure(NamedTuple):
    """One batch's association and realized coefficients (real requests only)."""

    beta: np.ndarray  # (n_req,) association at the final edited layer, before the write
    gamma: np.ndarray  # (n_req,) realized coefficient after the full multi-layer write
    planned_norm: np.ndarray  # (n_req,) ‖r_i‖ in hidden-state units
    state: EditState  # the state after the write (C_p updated)


def measure_write(cfg: ModelConfig, state: EditState, batch: EditBatch, Z: Array, ecfg: EditConfig, n: int,
                  timings: dict[str, float] | None = None) -> WriteMeasure:
    """Write targets ``Z`` (d_model, n_pad) with the multi-layer write and measure β and γ (§10 Fig. 4).

    Before the write: keys ``K_L`` (d_key, n_pad) and ``h_L`` (d_model, n_pad) at the final edited
    layer on ``state.params``, ``β`` from that state's C_p (``write.association_beta``; None for an editor
    without an association statistic).  After ``editor.write_targets`` (all layers, C_p update):
    ``h_L^post``; ``r = Z − h_L``, ``r̂ = h_L^post − h_L``.  ``n``: number of real requests (the first
    ``n`` columns).  The same measurement as ``EditConfig.measure`` in ``edit_batch``.
    Raises ``EditError`` (from the write) when the update is non-finite; ``state`` is then unchanged.
    """
    timings = {} if timings is None else timings
    before = measure_before(cfg, state, batch, ecfg, timings)
    new_state, _ = write_targets(cfg, state, batch, Z, ecfg, timings)
    m = measure_after(cfg, new_state, batch, ecfg, Z, before, n, timings)
    return WriteMeasure(beta=m["beta"], gamma=m["gamma"], planned_norm=m["planned_norm"], state=new_state)


@dataclasses.dataclass
class StreamMeasure:
    """A sequential stream of batches with per-request β, γ (in stream order)."""

    state: EditState
    case_ids: list[Any]
    beta: np.ndarray  # (n_req,)
    gamma: np.ndarray  # (n_req,)
    planned_norm: np.ndarray  # (n_req,)
    seconds: float


def measure_stream(cfg: ModelConfig, state: EditState, tokenizer: Any, batches: Sequence[Sequence[Any]],
                   templates: Sequence[Sequence[str]], ecfg: EditConfig, *, n_pad: int | None = None,
                   ) -> StreamMeasure:
    """Edit ``batches`` of requests in sequence (docs/FORMULAS.md §9) and measure β, γ per batch (§10 Fig. 4).

    Each batch goes through ``editor.edit_batch`` with ``EditConfig.measure`` on (Stage I, MetaKE refinement
    when ``ecfg.metake``, the write, β before it and γ after it, as :func:`measure_write`).
    ``n_pad``: pad every batch to this many requests (one compiled shape).  Python loops over
    batches only; each batch is one set of jitted computations.  Raises what ``edit_batch`` raises.
    """
    t0 = time.perf_counter()
    ecfg = dataclasses.replace(ecfg, measure=True)
    ids, betas, gammas, norms = [], [], [], []
    for reqs in batches:
        state, rep = edit_batch(cfg, state, tokenizer, reqs, templates, ecfg, n_pad=n_pad)
        if rep.beta is None:
            raise NotImplementedError(f"editor {ecfg.editor.name!r} has no association statistic β")
        ids += rep.case_ids
        betas.append(rep.beta)
        gammas.append(rep.gamma)
        norms.append(rep.planned_norm)
    return StreamMeasure(state=state, case_ids=ids, beta=np.concatenate(betas), gamma=np.concatenate(gammas),
                         planned_norm=np.concatenate(norms), seconds=time.perf_counter() - t0)


def quantile_bins(x: np.ndarray, y: np.ndarray, n_bins: int = 13) -> dict[str, np.ndarray]:
    """Sort by ``x`` and split into ``n_bins`` equal-count bins (docs/FORMULAS.md §10 Fig. 4: 13 bins of β).

    x, y: (n_req,).  Returns arrays of shape (n_bins,): ``x_mean``, ``x_lo``, ``x_hi`` (bin range),
    ``y_mean``, ``y_se`` (standard error ``std(ddof=1)/√count``; NaN for a bin of one), ``count``.
    Raises ValueError when the shapes differ or ``n_bins`` exceeds the number of points.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"quantile_bins: x {x.shape} and y {y.shape} must be equal 1-D shapes")
    if not 1 <= n_bins <= x.size:
        raise ValueError(f"quantile_bins: {n_bins} bins need at least as many points, got {x.size}")
    parts = np.array_split(np.argsort(x, kind="stable"), n_bins)
    out = {k: np.empty(n_bins) for k in ("x_mean", "x_lo", "x_hi", "y_mean", "y_se", "count")}
    for j, idx in enumerate(parts):
        xs, ys = x[idx], y[idx]
        out["x_mean"][j], out["x_lo"][j], out["x_hi"][j] = xs.mean(), xs.min(), xs.max()
        out["y_mean"][j] = ys.mean()
        out["y_se"][j] = ys.std(ddof=1) / np.sqrt(ys.size) if ys.size > 1 else np.nan
        out["count"][j] = ys.size
    return out


# ============================================================================ KL sweep (§10 Fig. 5)


def extreme_groups(beta: np.ndarray, frac: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the low-β (bottom ``frac``) and high-β (top ``frac``) requests (docs/FORMULAS.md §10 Fig. 5).

    beta: (n_req,).  Each group holds ``max(1, round(frac · n_req))`` requests.  Raises ValueError
    unless 0 < frac ≤ 0.5.
    """
    if not 0 < frac <= 0.5:
        raise ValueError(f"extreme_groups: frac must be in (0, 0.5], got {frac}")
    order = np.argsort(np.asarray(beta), kind="stable")
    k = max(1, int(round(frac * order.size)))
    return order[:k], order[-k:]


def best_on_grid(grid: Sequence[float], values: Sequence[float]) -> float:
    """The grid point of the largest value; ties go to the smaller grid point (docs/FORMULAS.md §10 Fig. 5)."""
    g, v = np.asarray(grid, np.float64), np.asarray(values, np.float64)
    if g.shape != v.shape or g.size == 0:
        raise ValueError(f"best_on_grid: grid {g.shape} and values {v.shape} must be equal and non-empty")
    best = np.nanmax(v)
    return float(np.min(g[v == best]))


# ============================================================================ hidden-state shift (§10 Fig. 7)


@partial(jax.jit, static_argnames=("cfg",))
def _last_hidden(cfg: ModelConfig, params: Any, tokens: Array, mask: Array, last: Array) -> Array:
    out = forward(cfg, params, tokens, mask, taps=(cfg.n_layers - 1,), tap_positions=last[:, None])
    return out.hidden[0, :, 0, :].astype(jnp.float32)


def final_hidden(cfg: ModelConfig, params: Any, tokenizer: Any, prompts: Sequence[str], *,
                 batch_size: int = 64) -> np.ndarray:
    """Final-layer block output at each prompt's last token (docs/FORMULAS.md §10 Fig. 7).

    Returns (n_query, d_model) float32.  Prompts are tokenized as model inputs (BOS where the tokenizer
    adds one), right-padded per chunk of ``batch_size`` (the last chunk padded with copies, so every
    chunk has one compiled shape per length bucket).  Raises ValueError for an empty prompt list.
    """
    if not prompts:
        raise ValueError("final_hidden: no prompts")
    rows = [encode(tokenizer, p) for p in prompts]
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        tokens, mask, lengths = pad_right(chunk, pad_id(tokenizer), n_rows=batch_size)
        h = _last_hidden(cfg, params, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(lengths - 1))
        out.append(np.asarray(h)[:len(chunk)])
    return np.concatenate(out)


def relative_shift(H_pre: np.ndarray, H_post: np.ndarray) -> np.ndarray:
    """Per-query relative shift ``‖h_post − h_pre‖ / ‖h_pre‖`` (n_query,), dimensionless (§10 Fig. 7)."""
    H_pre, H_post = np.asarray(H_pre, np.float64), np.asarray(H_post, np.float64)
    if H_pre.shape != H_post.shape:
        raise ValueError(f"relative_shift: shapes differ {H_pre.shape} vs {H_post.shape}")
    return np.linalg.norm(H_post - H_pre, axis=1) / np.linalg.norm(H_pre, axis=1)


@jax.jit
def _mmd2(X: Array, Y: Array) -> tuple[Array, Array]:
    Zs = jnp.concatenate([X, Y], axis=0)
    Zs = Zs - Zs.mean(axis=0)  # centring first limits cancellation in ‖x‖² + ‖y‖² − 2⟨x, y⟩
    sq = jnp.sum(Zs * Zs, axis=1)
    D2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * jnp.matmul(Zs, Zs.T, precision=_HI), 0.0)
    n = Zs.shape[0]
    iu = jnp.triu_indices(n, 1)
    sigma2 = jnp.median(jnp.sqrt(D2[iu])) ** 2
    Kz = jnp.exp(-D2 / (2.0 * jnp.maximum(sigma2, 1e-30)))
    m = X.shape[0]
    kxx, kyy, kxy = Kz[:m, :m].mean(), Kz[m:, m:].mean(), Kz[:m, m:].mean()
    return kxx + kyy - 2.0 * kxy, jnp.sqrt(sigma2)


def rbf_mmd2(X: np.ndarray, Y: np.ndarray) -> tuple[float, float]:
    """Biased (V-statistic) MMD² between two sets with an RBF kernel, median heuristic (§10 Fig. 7).

    ``k(x, y) = exp(−‖x − y‖² / (2σ²))``, σ = median pairwise Euclidean distance of the pooled set.
    X: (n_x, d_model), Y: (n_y, d_model).  Returns ``(mmd2, sigma)``; MMD² is dimensionless, in
    [0, 2], exactly 0 for identical sets; σ is in hidden-state units.  Memory O((n_x + n_y)²).
    Raises ValueError when the widths differ or a set is empty.
    """
    X, Y = np.asarray(X, np.float32), np.asarray(Y, np.float32)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[1] != Y.shape[1] or not len(X) or not len(Y):
        raise ValueError(f"rbf_mmd2: need two non-empty (n, d) sets of one width, got {X.shape}, {Y.shape}")
    v, s = _mmd2(jnp.asarray(X), jnp.asarray(Y))
    return float(v), float(s)


def pca_2d(reference: np.ndarray, *others: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Project sets onto the top-2 principal axes of ``reference`` (numpy SVD; §10 Fig. 7).

    reference: (n_query, d_model); others: (n_*, d_model).  Returns ([ref_2d, *others_2d] each (n, 2),
    explained-variance ratio of the two axes (2,)).  Fitting on one set (the pre-edit states) keeps
    every method on the same axes.
    """
    R = np.asarray(reference, np.float64)
    mu = R.mean(axis=0)
    _, s, Vt = np.linalg.svd(R - mu, full_matrices=False)
    var = s ** 2
    proj = [(np.asarray(x, np.float64) - mu) @ Vt[:2].T for x in (R, *others)]
    return proj, var[:2] / var.sum()


from metake_jax.statistics import paired_bootstrap, verdict  # noqa: E402,F401  (re-exported)
