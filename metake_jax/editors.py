"""Closed-form Stage II editors, gates and association statistics (docs/FORMULAS.md §4–§6).

Conventions (docs/FORMULAS.md §1): requests are **columns** — keys ``K`` (d_k, n), residuals ``R`` (d, n).
Every increment returned here is in the Flax ``(in, out)`` kernel layout of
``params['layers']['mlp']['fc_out']['kernel'][l]``, i.e. ``Δᵀ`` of shape (d_k, d)
(docs/FORMULAS.md §R4e / §R11.9).

Every editor is "closed form = residual × keysᵀ × gate":  ``Δ = R Kᵀ G`` with

* MEMIT (§4):      ``G = (λ_C C0 + C_p + K Kᵀ)⁻¹``           (C_p = 0 for plain MEMIT; MEMIT_seq adds it)
* AlphaEdit (§4):  ``G = P ((K Kᵀ + C_p) P + λ I)⁻¹``       (= ``(P (K Kᵀ + C_p) + λ I)⁻¹ P``)
* key-only (§6 ablation): ``G = (K Kᵀ + λ I)⁻¹``

The increment functions solve the reference's linear system directly (no explicit inverse);
the ``*_gate`` functions form ``G`` explicitly (for the MetaKE look-ahead, §6) and
``increment_from_gate(K, R, G)`` reproduces the same increments.

Solve precision (docs/FORMULAS.md §R11.1): MEMIT solves in float64, AlphaEdit in float32.
JAX silently computes in float32 unless 64-bit mode is on, so ``solve_dtype=jnp.float64`` works as:

* called **eagerly** (not under an outer ``jax.jit``/``grad``) with x64 off: the function turns
  x64 on for the duration of its own solve (``jax.enable_x64(True)``) and returns float32 —
  callers need to do nothing;
* called **under an outer trace**: the caller must enable x64 around that traced call,
  ``with jax.enable_x64(True): jitted_step(...)``, or pass ``solve_dtype=jnp.float32``;
  otherwise a ``ValueError`` says so (never a silent downgrade).

All matmuls use ``Precision.HIGHEST`` (no TF32 on GPU).  Results are cast back to the keys'
dtype (float32).  ``return_diagnostics=True`` also returns :class:`SolveDiagnostics` of the
solve (relative residual, condition estimate); :func:`check_solve` turns bad ones into an
:class:`~metake_jax.errors.IllConditionedError` and :func:`check_finite` refuses NaN/Inf.
"""
from __future__ import annotations

import contextlib
from functools import partial
from typing import Any, Iterator, NamedTuple

import chex
import jax
import jax.numpy as jnp

from metake_jax.errors import EditError, IllConditionedError

Array = jax.Array
DType = Any

__all__ = [
    "FORWARD_ERROR_TOL", "RESIDUAL_TOL", "SolveDiagnostics", "alphaedit_gate", "alphaedit_increment",
    "alphaedit_system", "association", "check_finite", "check_solve", "increment_from_gate",
    "interaction_matrix", "keyonly_gate",
    "memit_association", "memit_gate", "memit_increment", "memit_interaction_matrix",
    "memit_seq_increment", "memit_system",
]

#: Default tolerance on the relative solve residual ‖A X − B‖_F / ‖B‖_F (see check_solve).
RESIDUAL_TOL = 1e-2
#: Default tolerance on the estimated forward error cond_est · eps (see check_solve).
FORWARD_ERROR_TOL = 1e-1

_HI = jax.lax.Precision.HIGHEST


def _mm(a: Array, b: Array) -> Array:
    return jnp.matmul(a, b, precision=_HI)


# ----------------------------------------------------------------------------- precision scope


@contextlib.contextmanager
def _solve_scope(solve_dtype: DType, *arrays: Any) -> Iterator[Any]:
    """Yield the numpy dtype to solve in, enabling x64 locally when float64 is asked eagerly."""
    dt = jnp.dtype(solve_dtype)
    if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise ValueError(f"solve_dtype must be float32 or float64, got {dt}")
    if dt == jnp.float64 and not jax.config.jax_enable_x64:
        if any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(arrays)):
            raise ValueError(
                "solve_dtype=float64 inside a jax transformation needs 64-bit mode: wrap the "
                "outer traced call in `with jax.enable_x64(True): ...` (or enable jax_enable_x64), "
                "or pass solve_dtype=jnp.float32"
            )
        with jax.enable_x64(True):
            yield dt
    else:
        yield dt


def _check_kr(K: Array, R: Array | None = None) -> None:
    chex.assert_rank(K, 2)
    if R is not None:
        chex.assert_rank(R, 2)
        if R.shape[1] != K.shape[1]:
            raise ValueError(
                f"residuals R {R.shape} and keys K {K.shape} disagree on the number of requests "
                "(requests are columns)"
            )


def _check_square(name: str, X: Array | None, d_k: int) -> None:
    if X is not None:
        chex.assert_shape(X, (d_k, d_k), custom_message=f"{name} must be (d_k, d_k) = ({d_k}, {d_k})")


class SolveDiagnostics(NamedTuple):
    """Reliability figures of one solve ``A X = B`` (see :func:`check_solve`).

    rel_residual: ``‖A X − B‖_F / ‖B‖_F``.
    cond_est:     a cheap estimate of cond(A) from the LU factors already computed for the solve:
                  ``max(max|u_ii| / min|u_ii|, ‖A‖_F ‖X‖_F / ‖B‖_F)``; ``cond_est · eps``
                  approximates the relative forward error of the solve.
    eps:          machine epsilon of the solve dtype.
    """

    rel_residual: Array
    cond_est: Array
    eps: Array


def _lu_solve(A: Array, B: Array) -> tuple[Array, SolveDiagnostics]:
    """``X = A⁻¹ B`` by LU with partial pivoting (what ``jnp.linalg.solve`` does) + diagnostics."""
    lu, piv = jax.scipy.linalg.lu_factor(A)
    X = jax.scipy.linalg.lu_solve((lu, piv), B)
    nb = jnp.linalg.norm(B)
    nb = jnp.where(nb > 0, nb, 1.0)
    res = jnp.linalg.norm(_mm(A, X) - B) / nb
    u = jnp.abs(jnp.diagonal(lu))
    pivot_ratio = jnp.max(u) / jnp.min(u)  # inf for an exactly singular A
    cond = jnp.maximum(pivot_ratio, jnp.linalg.norm(A) * jnp.linalg.norm(X) / nb)
    eps = jnp.asarray(jnp.finfo(A.dtype).eps, jnp.float32)
    return X, SolveDiagnostics(res.astype(jnp.float32), cond.astype(jnp.float32), eps)


def _cp(Cp: Array | None, dt: Any) -> Array | float:
    return 0.0 if Cp is None else Cp.astype(dt)


# ----------------------------------------------------------------------------- system matrices


@partial(jax.jit, static_argnames=("dt",))
def _memit_system(K, C0, lam, Cp, dt):
    K = K.astype(dt)
    return jnp.asarray(lam, dt) * C0.astype(dt) + _cp(Cp, dt) + _mm(K, K.T)


@partial(jax.jit, static_argnames=("dt",))
def _alphaedit_system(K, P, Cp, l2, dt):
    K, P = K.astype(dt), P.astype(dt)
    M = _mm(K, K.T) + _cp(Cp, dt)
    return _mm(P, M) + jnp.asarray(l2, dt) * jnp.eye(K.shape[0], dtype=dt)


def memit_system(K: Array, C0: Array, lam: float | Array, Cp: Array | None = None, *,
                 solve_dtype: DType = jnp.float32) -> Array:
    """``A = λ_C C0 + C_p + K Kᵀ`` (docs/FORMULAS.md §4 MEMIT; §R4 MEMIT_seq adds C_p)."""
    _check_kr(K)
    _check_square("C0", C0, K.shape[0])
    _check_square("Cp", Cp, K.shape[0])
    with _solve_scope(solve_dtype, K, C0, Cp, lam) as dt:
        return _memit_system(K, C0, lam, Cp, dt)


def alphaedit_system(K: Array, P: Array, Cp: Array | None, l2: float | Array, *,
                     solve_dtype: DType = jnp.float32) -> Array:
    """``A = P (K Kᵀ + C_p) + λ I`` — the matrix AlphaEdit's reference solves with (docs/FORMULAS.md §R5)."""
    _check_kr(K)
    _check_square("P", P, K.shape[0])
    _check_square("Cp", Cp, K.shape[0])
    with _solve_scope(solve_dtype, K, P, Cp, l2) as dt:
        return _alphaedit_system(K, P, Cp, l2, dt)


# ----------------------------------------------------------------------------- increments


@partial(jax.jit, static_argnames=("dt",))
def _memit_increment(K, R, C0, lam, Cp, dt):
    A = _memit_system(K, C0, lam, Cp, dt)
    Kd = K.astype(dt)
    X, diag = _lu_solve(A, Kd)  # (d_k, n) = A⁻¹ K
    inc = _mm(X, R.astype(dt).T)  # (d_k, d) = (R Kᵀ A⁻¹)ᵀ  (A symmetric)
    return inc.astype(K.dtype), diag


def memit_increment(K: Array, R: Array, C0: Array, lam: float | Array, Cp: Array | None = None, *,
                    solve_dtype: DType = jnp.float64, return_diagnostics: bool = False):
    """MEMIT kernel increment ``Δᵀ = (R Kᵀ (λ_C C0 + C_p + K Kᵀ)⁻¹)ᵀ``, shape (d_k, d).

    docs/FORMULAS.md §4; §R4 step 2d (``X = solve(A, K)``, ``Δ = R Xᵀ``, float64).
    ``Cp`` (d_k, d_k) gives MEMIT_seq (docs/FORMULAS.md §R4); ``None`` = plain MEMIT.
    With ``return_diagnostics`` returns ``(increment, SolveDiagnostics)``.
    """
    _check_kr(K, R)
    _check_square("C0", C0, K.shape[0])
    _check_square("Cp", Cp, K.shape[0])
    with _solve_scope(solve_dtype, K, R, C0, Cp, lam) as dt:
        inc, res = _memit_increment(K, R, C0, lam, Cp, dt)
    return (inc, res) if return_diagnostics else inc


def memit_seq_increment(K: Array, R: Array, C0: Array, lam: float | Array, Cp: Array, **kw: Any):
    """MEMIT_seq (docs/FORMULAS.md §R4): ``A = λ_C C0 + C_p + K Kᵀ``; same as ``memit_increment(..., Cp)``."""
    return memit_increment(K, R, C0, lam, Cp, **kw)


@partial(jax.jit, static_argnames=("dt",))
def _alphaedit_increment(K, R, P, Cp, l2, dt):
    A = _alphaedit_system(K, P, Cp, l2, dt)
    B = _mm(_mm(P.astype(dt), K.astype(dt)), R.astype(dt).T)  # P K Rᵀ  (d_k, d)
    X, diag = _lu_solve(A, B)
    return X.astype(K.dtype), diag


def alphaedit_increment(K: Array, R: Array, P: Array, Cp: Array | None, l2: float | Array, *,
                        solve_dtype: DType = jnp.float32, return_diagnostics: bool = False):
    """AlphaEdit kernel increment ``Δᵀ = (R Kᵀ P ((K Kᵀ + C_p) P + λ I)⁻¹)ᵀ``, shape (d_k, d).

    Computed as the reference does (docs/FORMULAS.md §R5): ``X = solve(P (K Kᵀ + C_p) + λ I, P K Rᵀ)``,
    float32 by default.  ``Cp=None`` means no previous edits.  docs/FORMULAS.md §4.
    With ``return_diagnostics`` returns ``(increment, SolveDiagnostics)``.
    """
    _check_kr(K, R)
    _check_square("P", P, K.shape[0])
    _check_square("Cp", Cp, K.shape[0])
    with _solve_scope(solve_dtype, K, R, P, Cp, l2) as dt:
        inc, res = _alphaedit_increment(K, R, P, Cp, l2, dt)
    return (inc, res) if return_diagnostics else inc


# ----------------------------------------------------------------------------- gates (docs/FORMULAS.md §6)


@partial(jax.jit, static_argnames=("out_dtype", "dt"))
def _solve_eye(A, out_dtype, dt):
    return jnp.linalg.solve(A, jnp.eye(A.shape[0], dtype=dt)).astype(out_dtype)


@partial(jax.jit, static_argnames=("dt",))
def _alphaedit_gate(K, P, Cp, l2, dt):
    A = _alphaedit_system(K, P, Cp, l2, dt)
    return jnp.linalg.solve(A, P.astype(dt)).astype(K.dtype)  # (P M + λI)⁻¹ P = P (M P + λI)⁻¹


def alphaedit_gate(K: Array, P: Array, Cp: Array | None, l2: float | Array, *,
                   solve_dtype: DType = jnp.float32) -> Array:
    """Structural gate ``G = P ((K Kᵀ + C_p) P + λ I)⁻¹`` (d_k, d_k), docs/FORMULAS.md §6.

    Formed as ``solve(P (K Kᵀ + C_p) + λ I, P)`` (push-through identity; G is symmetric).
    """
    _check_kr(K)
    _check_square("P", P, K.shape[0])
    _check_square("Cp", Cp, K.shape[0])
    with _solve_scope(solve_dtype, K, P, Cp, l2) as dt:
        return _alphaedit_gate(K, P, Cp, l2, dt)


def keyonly_gate(K: Array, l2: float | Array, *, solve_dtype: DType = jnp.float32) -> Array:
    """Key-only gate ``(K Kᵀ + λ I)⁻¹`` (docs/FORMULAS.md §6 ablation "w/o structural gate")."""
    _check_kr(K)
    with _solve_scope(solve_dtype, K, l2) as dt:
        d_k = K.shape[0]
        A = _memit_system(K, jnp.eye(d_k, dtype=K.dtype), l2, None, dt)  # λ I + K Kᵀ
        return _solve_eye(A, K.dtype, dt)


def memit_gate(K: Array, C0: Array, lam: float | Array, Cp: Array | None = None, *,
               solve_dtype: DType = jnp.float64) -> Array:
    """MEMIT gate ``(λ_C C0 + C_p + K Kᵀ)⁻¹`` (d_k, d_k), docs/FORMULAS.md §4 / §6."""
    _check_kr(K)
    _check_square("C0", C0, K.shape[0])
    _check_square("Cp", Cp, K.shape[0])
    with _solve_scope(solve_dtype, K, C0, Cp, lam) as dt:
        return _solve_eye(_memit_system(K, C0, lam, Cp, dt), K.dtype, dt)


@jax.jit
def increment_from_gate(K: Array, R: Array, G: Array) -> Array:
    """Kernel increment ``(R Kᵀ G)ᵀ`` (d_k, d) — docs/FORMULAS.md §6 eq. 8 with R = Z − H_L.

    Differentiable in ``R`` (the MetaKE look-ahead takes ``jax.grad`` through it).
    """
    _check_kr(K, R)
    _check_square("G", G, K.shape[0])
    return _mm(G.T, _mm(K, R.T))


# ----------------------------------------------------------------------------- association (§5)


@partial(jax.jit, static_argnames=("dt",))
def _association(K, P, Cp, l2, dt):
    Kd, Pd = K.astype(dt), P.astype(dt)
    d_k = K.shape[0]
    A0 = jnp.asarray(l2, dt) * jnp.eye(d_k, dtype=dt)
    if Cp is not None:
        A0 = A0 + _mm(Pd, Cp.astype(dt))
    Y = jnp.linalg.solve(A0, _mm(Pd, Kd))  # (P C_p + λI)⁻¹ P K = P (C_p P + λI)⁻¹ K
    beta = jnp.sum(Kd * Y, axis=0)
    return (beta / (1.0 + beta)).astype(K.dtype)


def association(K: Array, P: Array, Cp: Array | None, l2: float | Array, *,
                solve_dtype: DType = jnp.float32) -> Array:
    """Per-request AlphaEdit association ``α_i = β_i / (1 + β_i)``, ``β_i = k_iᵀ P (C_p P + λI)⁻¹ k_i``.

    docs/FORMULAS.md §5 (Proposition 1), the single-request formula applied to each column of ``K``
    on its own: a lone request with key k and residual r is written as ``Δ k = α r``.  Shape (n,).
    """
    _check_kr(K)
    _check_square("P", P, K.shape[0])
    _check_square("Cp", Cp, K.shape[0])
    with _solve_scope(solve_dtype, K, P, Cp, l2) as dt:
        return _association(K, P, Cp, l2, dt)


@partial(jax.jit, static_argnames=("dt",))
def _memit_association(K, C0, lam, Cp, dt):
    Kd = K.astype(dt)
    A0 = jnp.asarray(lam, dt) * C0.astype(dt) + _cp(Cp, dt)
    beta = jnp.sum(Kd * jnp.linalg.solve(A0, Kd), axis=0)
    return (beta / (1.0 + beta)).astype(K.dtype)


def memit_association(K: Array, C0: Array, lam: float | Array, Cp: Array | None = None, *,
                      solve_dtype: DType = jnp.float64) -> Array:
    """MEMIT association ``α_i = β_i/(1+β_i)``, ``β_i = k_iᵀ (λ_C C0 + C_p)⁻¹ k_i`` (docs/FORMULAS.md §5). (n,)"""
    _check_kr(K)
    _check_square("C0", C0, K.shape[0])
    _check_square("Cp", Cp, K.shape[0])
    with _solve_scope(solve_dtype, K, C0, Cp, lam) as dt:
        return _memit_association(K, C0, lam, Cp, dt)


@partial(jax.jit, static_argnames=("dt",))
def _interaction(K, P, Cp, l2, dt):
    A = _alphaedit_system(K, P, Cp, l2, dt)
    Kd = K.astype(dt)
    return _mm(Kd.T, jnp.linalg.solve(A, _mm(P.astype(dt), Kd))).astype(K.dtype)


def interaction_matrix(K: Array, P: Array, Cp: Array | None, l2: float | Array, *,
                       solve_dtype: DType = jnp.float32) -> Array:
    """Request-interaction matrix ``M = Kᵀ P ((K Kᵀ + C_p) P + λI)⁻¹ K`` (n, n), docs/FORMULAS.md §5.

    The realized output change of an AlphaEdit write at the edited keys is ``Δ K = R M``.
    """
    _check_kr(K)
    _check_square("P", P, K.shape[0])
    _check_square("Cp", Cp, K.shape[0])
    with _solve_scope(solve_dtype, K, P, Cp, l2) as dt:
        return _interaction(K, P, Cp, l2, dt)


@partial(jax.jit, static_argnames=("dt",))
def _memit_interaction(K, C0, lam, Cp, dt):
    A = _memit_system(K, C0, lam, Cp, dt)
    Kd = K.astype(dt)
    return _mm(Kd.T, jnp.linalg.solve(A, Kd)).astype(K.dtype)


def memit_interaction_matrix(K: Array, C0: Array, lam: float | Array, Cp: Array | None = None, *,
                             solve_dtype: DType = jnp.float64) -> Array:
    """MEMIT analog ``Kᵀ (λ_C C0 + C_p + K Kᵀ)⁻¹ K`` (n, n); ``Δ K = R M`` (docs/FORMULAS.md §R5)."""
    _check_kr(K)
    _check_square("C0", C0, K.shape[0])
    _check_square("Cp", Cp, K.shape[0])
    with _solve_scope(solve_dtype, K, C0, Cp, lam) as dt:
        return _memit_interaction(K, C0, lam, Cp, dt)


# ----------------------------------------------------------------------------- checks


def check_finite(increment: Array, layer: int) -> None:
    """Raise :class:`EditError` naming ``layer`` if ``increment`` holds NaN or Inf (never write it)."""
    bad = int(jnp.sum(~jnp.isfinite(increment)))
    if bad:
        raise EditError(
            f"layer {layer}: the weight increment has {bad} non-finite entries "
            f"(of {increment.size}); refusing to write it"
        )


def check_solve(diag: SolveDiagnostics, layer: int, *, tol: float = RESIDUAL_TOL,
                error_tol: float = FORWARD_ERROR_TOL) -> None:
    """Raise :class:`IllConditionedError` naming ``layer`` when a solve is unreliable.

    ``diag`` comes from ``return_diagnostics=True``.  Two tests (NaN fails both):

    * ``rel_residual > tol`` — the solve did not reproduce its right-hand side;
    * ``cond_est · eps > error_tol`` — the estimated forward error of the solve exceeds
      ``error_tol``: the system is numerically singular for the solve dtype, e.g. MEMIT in
      float32 with a rank-deficient C0, even though the residual itself can be tiny.

    Remedies: ``solve_dtype=float64`` (MEMIT), a larger regularizer, fewer edits per batch.
    """
    r, a, e = float(diag.rel_residual), float(diag.cond_est), float(diag.eps)
    if not r <= tol:
        raise IllConditionedError(
            f"layer {layer}: ill-conditioned solve, relative residual {r:.3g} > tol {tol:.3g}; "
            "the increment is unreliable (try solve_dtype=float64 or a larger regularizer)"
        )
    if not a * e <= error_tol:
        raise IllConditionedError(
            f"layer {layer}: ill-conditioned solve, cond estimate {a:.3g} x eps {e:.2g} = {a * e:.3g} "
            f"> {error_tol:.3g}; the increment is unreliable (try solve_dtype=float64 or a larger "
            "regularizer)"
        )
