"""MEMIT (docs/FORMULAS.md §4; §R4 — kmeng01/memit ``memit/memit_main.py``, AE ``memit/memit_main.py``).

Per edited layer t of m, on the model carrying the earlier layers' increments of this batch:
``Δ_t = (R / (m − t)) Kᵀ (λ_C C0 + K Kᵀ)⁻¹`` solved in float64 (``X = solve(A, K)``, ``Δ = R Xᵀ``).
``use_cache`` gives MEMIT_seq (C_p added to the system matrix, docs/FORMULAS.md §R4).
The gate (Δ = R·B) is ``B = Kᵀ (λ_C C0 + C_p + K Kᵀ)⁻¹``.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from metake_jax.editors.base import Editor, LayerStats
from metake_jax.editors.linalg import (
    DType, SolveDiagnostics, cache_term, checked_scope, lu_solve, mm, solve_eye,
)

Array = jax.Array


@partial(jax.jit, static_argnames=("dt",))
def _memit_system(K, C0, lam, Cp, dt):
    K = K.astype(dt)
    return jnp.asarray(lam, dt) * C0.astype(dt) + cache_term(Cp, dt) + mm(K, K.T)


def memit_system(K: Array, C0: Array, lam: float | Array, Cp: Array | None = None, *,
                 solve_dtype: DType = jnp.float32) -> Array:
    """``A = λ_C C0 + C_p + K Kᵀ`` (docs/FORMULAS.md §4 MEMIT; §R4 MEMIT_seq adds C_p)."""
    with checked_scope(solve_dtype, K, scalars=(lam,), C0=C0, Cp=Cp) as dt:
        return _memit_system(K, C0, lam, Cp, dt)


@partial(jax.jit, static_argnames=("dt",))
def _memit_increment(K, R, C0, lam, Cp, dt):
    A = _memit_system(K, C0, lam, Cp, dt)
    Kd = K.astype(dt)
    X, diag = lu_solve(A, Kd)  # (d_k, n) = A⁻¹ K
    inc = mm(X, R.astype(dt).T)  # (d_k, d) = (R Kᵀ A⁻¹)ᵀ  (A symmetric)
    return inc.astype(K.dtype), diag


def memit_increment(K: Array, R: Array, C0: Array, lam: float | Array, Cp: Array | None = None, *,
                    solve_dtype: DType = jnp.float64, return_diagnostics: bool = False):
    """MEMIT kernel increment ``Δᵀ = (R Kᵀ (λ_C C0 + C_p + K Kᵀ)⁻¹)ᵀ``, shape (d_k, d).

    docs/FORMULAS.md §4; §R4 step 2d (``X = solve(A, K)``, ``Δ = R Xᵀ``, float64).
    ``Cp`` (d_k, d_k) gives MEMIT_seq (docs/FORMULAS.md §R4); ``None`` = plain MEMIT.
    With ``return_diagnostics`` returns ``(increment, SolveDiagnostics)``.
    """
    with checked_scope(solve_dtype, K, R, scalars=(lam,), C0=C0, Cp=Cp) as dt:
        inc, res = _memit_increment(K, R, C0, lam, Cp, dt)
    return (inc, res) if return_diagnostics else inc


def memit_seq_increment(K: Array, R: Array, C0: Array, lam: float | Array, Cp: Array, **kw: Any):
    """MEMIT_seq (docs/FORMULAS.md §R4): ``A = λ_C C0 + C_p + K Kᵀ``; same as ``memit_increment(..., Cp)``."""
    return memit_increment(K, R, C0, lam, Cp, **kw)


def memit_gate(K: Array, C0: Array, lam: float | Array, Cp: Array | None = None, *,
               solve_dtype: DType = jnp.float64) -> Array:
    """MEMIT gate ``(λ_C C0 + C_p + K Kᵀ)⁻¹`` (d_k, d_k), docs/FORMULAS.md §4 / §6."""
    with checked_scope(solve_dtype, K, scalars=(lam,), C0=C0, Cp=Cp) as dt:
        return solve_eye(_memit_system(K, C0, lam, Cp, dt), K.dtype, dt)


@partial(jax.jit, static_argnames=("dt",))
def _memit_association(K, C0, lam, Cp, dt):
    Kd = K.astype(dt)
    A0 = jnp.asarray(lam, dt) * C0.astype(dt) + cache_term(Cp, dt)
    beta = jnp.sum(Kd * jnp.linalg.solve(A0, Kd), axis=0)
    return (beta / (1.0 + beta)).astype(K.dtype)


def memit_association(K: Array, C0: Array, lam: float | Array, Cp: Array | None = None, *,
                      solve_dtype: DType = jnp.float64) -> Array:
    """MEMIT association ``α_i = β_i/(1+β_i)``, ``β_i = k_iᵀ (λ_C C0 + C_p)⁻¹ k_i`` (docs/FORMULAS.md §5). (n,)"""
    with checked_scope(solve_dtype, K, scalars=(lam,), C0=C0, Cp=Cp) as dt:
        return _memit_association(K, C0, lam, Cp, dt)


@partial(jax.jit, static_argnames=("dt",))
def _memit_interaction(K, C0, lam, Cp, dt):
    A = _memit_system(K, C0, lam, Cp, dt)
    Kd = K.astype(dt)
    return mm(Kd.T, jnp.linalg.solve(A, Kd)).astype(K.dtype)


def memit_interaction_matrix(K: Array, C0: Array, lam: float | Array, Cp: Array | None = None, *,
                             solve_dtype: DType = jnp.float64) -> Array:
    """MEMIT analog ``Kᵀ (λ_C C0 + C_p + K Kᵀ)⁻¹ K`` (n, n); ``Δ K = R M`` (docs/FORMULAS.md §R5)."""
    with checked_scope(solve_dtype, K, scalars=(lam,), C0=C0, Cp=Cp) as dt:
        return _memit_interaction(K, C0, lam, Cp, dt)


@dataclasses.dataclass(frozen=True)
class MEMIT(Editor):
    """MEMIT: λ_C C0-regularized least squares (docs/FORMULAS.md §4).

    mom2_update_weight: λ_C (reference 15000 for GPT-J / Llama-3, 20000 for GPT-2 XL).
    use_cache: add C_p to the system matrix (MEMIT_seq).
    """

    name: ClassVar[str] = "memit"
    needs: ClassVar[frozenset[str]] = frozenset({"C0"})
    reference: ClassVar[str] = "kmeng01/memit memit/memit_main.py (AE copy)"
    nonnegative: ClassVar[tuple[str, ...]] = ("mom2_update_weight",)

    solve_dtype: str = "float64"
    mom2_update_weight: float = 15000.0
    use_cache: bool = False

    def _cache(self, stats: LayerStats, slot: Array | int) -> Array | None:
        return stats.Cp[slot] if self.use_cache else None

    def increment(self, K, R, slot, stats, K_bare=None):
        return memit_increment(K, R, stats.C0[slot], self.mom2_update_weight, self._cache(stats, slot),
                               solve_dtype=self.dtype, return_diagnostics=True)

    def gate(self, K, slot, stats, K_bare=None):
        G = memit_gate(K, stats.C0[slot], self.mom2_update_weight, self._cache(stats, slot),
                       solve_dtype=self.dtype)
        return mm(K.T, G)

    def association(self, K, slot, stats):
        return memit_association(K, stats.C0[slot], self.mom2_update_weight, self._cache(stats, slot),
                                 solve_dtype=jnp.float64)

EDITOR = MEMIT
