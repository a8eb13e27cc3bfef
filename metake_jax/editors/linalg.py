"""Linear algebra shared by the closed-form editors (docs/FORMULAS.md §4–§6, §R11.1).

Conventions (docs/FORMULAS.md §1): requests are **columns** — keys ``K`` (d_k, n), residuals ``R`` (d, n).
Every increment is in the Flax ``(in, out)`` kernel layout of
``params['layers']['mlp']['fc_out']['kernel'][l]``, i.e. ``Δᵀ`` of shape (d_k, d)
(docs/FORMULAS.md §R4e / §R11.9).  The editors themselves (one module each) are in this package;
this module holds what they share: the solve-precision scope, an LU solve with reliability
diagnostics (:class:`SolveDiagnostics`, :func:`check_solve`), :func:`check_finite`, the key-only
gate of the MetaKE ablation and :func:`increment_from_gate`.

Solve precision (docs/FORMULAS.md §R11.1): MEMIT solves in float64, AlphaEdit in float32.
JAX silently computes in float32 unless 64-bit mode is on, so ``solve_dtype=jnp.float64`` works as:

* called **eagerly** (not under an outer ``jax.jit``/``grad``) with x64 off: the function turns
  x64 on for the duration of its own solve (``jax.enable_x64(True)``) and returns float32 —
  callers need to do nothing;
* called **under an outer trace**: the caller must enable x64 around that traced call,
  ``with jax.enable_x64(True): jitted_step(...)`` (``Editor.scope()``), or pass
  ``solve_dtype=jnp.float32``; otherwise a ``ValueError`` says so (never a silent downgrade).

All matmuls use ``Precision.HIGHEST`` (no TF32 on GPU).  Results are cast back to the keys'
dtype (float32).
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
    "FORWARD_ERROR_TOL", "RESIDUAL_TOL", "SolveDiagnostics", "check_finite", "check_solve",
    "cache_term", "check_kr", "checked_scope", "check_square", "increment_from_gate", "keyonly_gate", "lu_solve", "mm",
    "solve_eye", "solve_scope",
]

#: Default tolerance on the relative solve residual ‖A X − B‖_F / ‖B‖_F (see check_solve).
RESIDUAL_TOL = 1e-2
#: Default tolerance on the estimated forward error cond_est · eps (see check_solve).
FORWARD_ERROR_TOL = 1e-1

_HI = jax.lax.Precision.HIGHEST


def mm(a: Array, b: Array) -> Array:
    return jnp.matmul(a, b, precision=_HI)


# ----------------------------------------------------------------------------- precision scope


@contextlib.contextmanager
def solve_scope(solve_dtype: DType, *arrays: Any) -> Iterator[Any]:
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


def check_kr(K: Array, R: Array | None = None) -> None:
    chex.assert_rank(K, 2)
    if R is not None:
        chex.assert_rank(R, 2)
        if R.shape[1] != K.shape[1]:
            raise ValueError(
                f"residuals R {R.shape} and keys K {K.shape} disagree on the number of requests "
                "(requests are columns)"
            )


def check_square(name: str, X: Array | None, d_k: int) -> None:
    if X is not None:
        chex.assert_shape(X, (d_k, d_k), custom_message=f"{name} must be (d_k, d_k) = ({d_k}, {d_k})")


@contextlib.contextmanager
def checked_scope(solve_dtype: DType, K: Array, R: Array | None = None, *, scalars: tuple[Any, ...] = (),
                  **squares: Array | None) -> Iterator[Any]:
    """Shape checks (keys ``K`` (d_k, n), residuals ``R`` (d, n), each named (d_k, d_k) matrix of
    ``squares``; ``None`` skips one) then :func:`solve_scope` over every array: yields the solve dtype.
    Raises ValueError naming the mismatched argument."""
    check_kr(K, R)
    for name, X in squares.items():
        check_square(name, X, K.shape[0])
    with solve_scope(solve_dtype, K, R, *squares.values(), *scalars) as dt:
        yield dt


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


def lu_solve(A: Array, B: Array) -> tuple[Array, SolveDiagnostics]:
    """``X = A⁻¹ B`` by LU with partial pivoting (what ``jnp.linalg.solve`` does) + diagnostics."""
    lu, piv = jax.scipy.linalg.lu_factor(A)
    X = jax.scipy.linalg.lu_solve((lu, piv), B)
    nb = jnp.linalg.norm(B)
    nb = jnp.where(nb > 0, nb, 1.0)
    res = jnp.linalg.norm(mm(A, X) - B) / nb
    u = jnp.abs(jnp.diagonal(lu))
    pivot_ratio = jnp.max(u) / jnp.min(u)  # inf for an exactly singular A
    cond = jnp.maximum(pivot_ratio, jnp.linalg.norm(A) * jnp.linalg.norm(X) / nb)
    eps = jnp.asarray(jnp.finfo(A.dtype).eps, jnp.float32)
    return X, SolveDiagnostics(res.astype(jnp.float32), cond.astype(jnp.float32), eps)


def cache_term(Cp: Array | None, dt: Any) -> Array | float:
    return 0.0 if Cp is None else Cp.astype(dt)


# ----------------------------------------------------------------------------- gates


@partial(jax.jit, static_argnames=("out_dtype", "dt"))
def solve_eye(A, out_dtype, dt):
    return jnp.linalg.solve(A, jnp.eye(A.shape[0], dtype=dt)).astype(out_dtype)


def keyonly_gate(K: Array, l2: float | Array, *, solve_dtype: DType = jnp.float32) -> Array:
    """Key-only gate ``(K Kᵀ + λ I)⁻¹`` (docs/FORMULAS.md §6 ablation "w/o structural gate")."""
    with checked_scope(solve_dtype, K, scalars=(l2,)) as dt:
        d_k = K.shape[0]
        Kd = K.astype(dt)
        A = jnp.asarray(l2, dt) * jnp.eye(d_k, dtype=dt) + mm(Kd, Kd.T)  # λ I + K Kᵀ
        return solve_eye(A, K.dtype, dt)


@jax.jit
def increment_from_gate(K: Array, R: Array, G: Array) -> Array:
    """Kernel increment ``(R Kᵀ G)ᵀ`` (d_k, d) — docs/FORMULAS.md §6 eq. 8 with R = Z − H_L.

    Differentiable in ``R`` (the MetaKE look-ahead takes ``jax.grad`` through it).
    """
    check_kr(K, R)
    check_square("G", G, K.shape[0])
    return mm(G.T, mm(K, R.T))


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
