"""AlphaEdit (docs/FORMULAS.md §4; §R5 — jianghoucheng/AlphaEdit ``AlphaEdit/AlphaEdit_main.py``).

``Δ_t = (R / (m − t)) Kᵀ P ((K Kᵀ + C_p) P + λ I)⁻¹`` with the fixed null-space projector P of C0,
solved as the reference does (``X = solve(P (K Kᵀ + C_p) + λ I, P K Rᵀ)``, float32).
The gate (Δ = R·B) is ``B = Kᵀ P ((K Kᵀ + C_p) P + λ I)⁻¹`` — the structural gate of MetaKE (§6).
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import ClassVar

import jax
import jax.numpy as jnp

from metake_jax.editors.base import Editor
from metake_jax.editors.linalg import (
    DType, cache_term, checked_scope, lu_solve, mm,
)

Array = jax.Array


@partial(jax.jit, static_argnames=("dt",))
def _alphaedit_system(K, P, Cp, l2, dt):
    K, P = K.astype(dt), P.astype(dt)
    M = mm(K, K.T) + cache_term(Cp, dt)
    return mm(P, M) + jnp.asarray(l2, dt) * jnp.eye(K.shape[0], dtype=dt)


def alphaedit_system(K: Array, P: Array, Cp: Array | None, l2: float | Array, *,
                     solve_dtype: DType = jnp.float32) -> Array:
    """``A = P (K Kᵀ + C_p) + λ I`` — the matrix AlphaEdit's reference solves with (docs/FORMULAS.md §R5)."""
    with checked_scope(solve_dtype, K, scalars=(l2,), P=P, Cp=Cp) as dt:
        return _alphaedit_system(K, P, Cp, l2, dt)


@partial(jax.jit, static_argnames=("dt",))
def _alphaedit_increment(K, R, P, Cp, l2, dt):
    A = _alphaedit_system(K, P, Cp, l2, dt)
    B = mm(mm(P.astype(dt), K.astype(dt)), R.astype(dt).T)  # P K Rᵀ  (d_k, d)
    X, diag = lu_solve(A, B)
    return X.astype(K.dtype), diag


def alphaedit_increment(K: Array, R: Array, P: Array, Cp: Array | None, l2: float | Array, *,
                        solve_dtype: DType = jnp.float32, return_diagnostics: bool = False):
    """AlphaEdit kernel increment ``Δᵀ = (R Kᵀ P ((K Kᵀ + C_p) P + λ I)⁻¹)ᵀ``, shape (d_k, d).

    Computed as the reference does (docs/FORMULAS.md §R5): ``X = solve(P (K Kᵀ + C_p) + λ I, P K Rᵀ)``,
    float32 by default.  ``Cp=None`` means no previous edits.  docs/FORMULAS.md §4.
    With ``return_diagnostics`` returns ``(increment, SolveDiagnostics)``.
    """
    with checked_scope(solve_dtype, K, R, scalars=(l2,), P=P, Cp=Cp) as dt:
        inc, res = _alphaedit_increment(K, R, P, Cp, l2, dt)
    return (inc, res) if return_diagnostics else inc


@partial(jax.jit, static_argnames=("dt",))
def _alphaedit_gate(K, P, Cp, l2, dt):
    A = _alphaedit_system(K, P, Cp, l2, dt)
    return jnp.linalg.solve(A, P.astype(dt)).astype(K.dtype)  # (P M + λI)⁻¹ P = P (M P + λI)⁻¹


def alphaedit_gate(K: Array, P: Array, Cp: Array | None, l2: float | Array, *,
                   solve_dtype: DType = jnp.float32) -> Array:
    """Structural gate ``G = P ((K Kᵀ + C_p) P + λ I)⁻¹`` (d_k, d_k), docs/FORMULAS.md §6.

    Formed as ``solve(P (K Kᵀ + C_p) + λ I, P)`` (push-through identity; G is symmetric).
    """
    with checked_scope(solve_dtype, K, scalars=(l2,), P=P, Cp=Cp) as dt:
        return _alphaedit_gate(K, P, Cp, l2, dt)


@partial(jax.jit, static_argnames=("dt",))
def _association(K, P, Cp, l2, dt):
    Kd, Pd = K.astype(dt), P.astype(dt)
    d_k = K.shape[0]
    A0 = jnp.asarray(l2, dt) * jnp.eye(d_k, dtype=dt)
    if Cp is not None:
        A0 = A0 + mm(Pd, Cp.astype(dt))
    Y = jnp.linalg.solve(A0, mm(Pd, Kd))  # (P C_p + λI)⁻¹ P K = P (C_p P + λI)⁻¹ K
    beta = jnp.sum(Kd * Y, axis=0)
    return (beta / (1.0 + beta)).astype(K.dtype)


def association(K: Array, P: Array, Cp: Array | None, l2: float | Array, *,
                solve_dtype: DType = jnp.float32) -> Array:
    """Per-request AlphaEdit association ``α_i = β_i / (1 + β_i)``, ``β_i = k_iᵀ P (C_p P + λI)⁻¹ k_i``.

    docs/FORMULAS.md §5 (Proposition 1), the single-request formula applied to each column of ``K``
    on its own: a lone request with key k and residual r is written as ``Δ k = α r``.  Shape (n,).
    """
    with checked_scope(solve_dtype, K, scalars=(l2,), P=P, Cp=Cp) as dt:
        return _association(K, P, Cp, l2, dt)


@partial(jax.jit, static_argnames=("dt",))
def _interaction(K, P, Cp, l2, dt):
    A = _alphaedit_system(K, P, Cp, l2, dt)
    Kd = K.astype(dt)
    return mm(Kd.T, jnp.linalg.solve(A, mm(P.astype(dt), Kd))).astype(K.dtype)


def interaction_matrix(K: Array, P: Array, Cp: Array | None, l2: float | Array, *,
                       solve_dtype: DType = jnp.float32) -> Array:
    """Request-interaction matrix ``M = Kᵀ P ((K Kᵀ + C_p) P + λI)⁻¹ K`` (n, n), docs/FORMULAS.md §5.

    The realized output change of an AlphaEdit write at the edited keys is ``Δ K = R M``.
    """
    with checked_scope(solve_dtype, K, scalars=(l2,), P=P, Cp=Cp) as dt:
        return _interaction(K, P, Cp, l2, dt)


@dataclasses.dataclass(frozen=True)
class AlphaEdit(Editor):
    """AlphaEdit: null-space-constrained update with the sequential cache C_p (docs/FORMULAS.md §4).

    l2: λ of ``P (K Kᵀ + C_p) + λ I`` (reference 10).
    """

    name: ClassVar[str] = "alphaedit"
    needs: ClassVar[frozenset[str]] = frozenset({"P"})
    reference: ClassVar[str] = "jianghoucheng/AlphaEdit AlphaEdit/AlphaEdit_main.py"
    nonnegative: ClassVar[tuple[str, ...]] = ("l2",)

    solve_dtype: str = "float32"
    l2: float = 10.0

    def increment(self, K, R, slot, stats, K_bare=None):
        return alphaedit_increment(K, R, stats.P[slot], stats.Cp[slot], self.l2, solve_dtype=self.dtype,
                                   return_diagnostics=True)

    def gate(self, K, slot, stats, K_bare=None):
        return mm(K.T, alphaedit_gate(K, stats.P[slot], stats.Cp[slot], self.l2, solve_dtype=self.dtype))

    def association(self, K, slot, stats):
        return association(K, stats.P[slot], stats.Cp[slot], self.l2, solve_dtype=jnp.float64)

EDITOR = AlphaEdit
