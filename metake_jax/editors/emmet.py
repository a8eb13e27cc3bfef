"""EMMET: equality-constrained batched update (docs/FORMULAS.md §4 "EMMET"; BASELINES.md §7).

Public code followed: scalable-model-editing/unified-model-editing ``emmet/emmet_main.py`` (the update
in ``execute_emmet``), the official EMMET; Stage I is MEMIT's ``compute_z`` unchanged.

Minimise ‖Δ K₀‖² subject to (W + Δ) K = V, per edited layer t of m (MEMIT's loop: keys and residual
recomputed on the model carrying the earlier layers' increments, residual split R/(m − t)):

    C = λ_C C0 + λ_u I                  (λ_C = mom2_update_weight, λ_u = update_norm_lambda)
    D = Kᵀ C⁻¹ K + λ_E I                (n_req × n_req; λ_E = emmet_lambda, only when n_req > 1)
    Δ = R D⁻¹ Kᵀ C⁻¹                    (float64)

The gate (Δ = R·B) is ``B = D⁻¹ Kᵀ C⁻¹`` (n_req, d_k).  For one request and λ_E = 0 this is ROME's closed
form on the MEMIT key, ``Δ = r (C⁻¹k)ᵀ / (kᵀC⁻¹k)``, so Δ k = r exactly.

Padding columns (zero keys, zero residuals) do not change the result: their rows/columns of D are
replaced by the identity, and ``n_req`` above counts the non-zero key columns (UM adds λ_E only when
the batch has more than one request; EasyEdit always adds it).

λ_C: the official code (UM) uses 1000 (GPT-2 XL) and 1 (GPT-J, Llama-2); EasyEdit uses 10⁴–10⁵.  We
follow UM.  With λ_u = 0, λ_C only matters through λ_E (λ_C scales C⁻¹, hence D, hence the weight of
λ_E relative to Kᵀ C⁻¹ K); the default 1 is UM's GPT-J / Llama-2 value.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import ClassVar

import jax
import jax.numpy as jnp

from metake_jax.editors.base import Editor, LayerStats
from metake_jax.editors.linalg import DType, SolveDiagnostics, checked_scope, lu_solve, mm

Array = jax.Array


def _worse(a: SolveDiagnostics, b: SolveDiagnostics) -> SolveDiagnostics:
    return SolveDiagnostics(jnp.maximum(a.rel_residual, b.rel_residual), jnp.maximum(a.cond_est, b.cond_est),
                            jnp.maximum(a.eps, b.eps))


@partial(jax.jit, static_argnames=("dt",))
def _emmet_parts(K, C0, lam_c, lam_u, lam_e, dt):
    """(X = C⁻¹K (d_k, n), D (n, n), diagnostics of the C solve)."""
    Kd = K.astype(dt)
    d_k, n = K.shape
    C = jnp.asarray(lam_c, dt) * C0.astype(dt) + jnp.asarray(lam_u, dt) * jnp.eye(d_k, dtype=dt)
    X, diag = lu_solve(C, Kd)
    pad = ~jnp.any(Kd != 0, axis=0)  # (n,) zero key columns
    n_real = jnp.sum(~pad)
    lam = jnp.where(n_real > 1, jnp.asarray(lam_e, dt), 0.0)
    D = mm(Kd.T, X) + jnp.diag(jnp.where(pad, 1.0, lam).astype(dt))
    return X, D, diag


@partial(jax.jit, static_argnames=("dt",))
def _emmet_increment(K, R, C0, lam_c, lam_u, lam_e, dt):
    X, D, dc = _emmet_parts(K, C0, lam_c, lam_u, lam_e, dt)
    Y, dd = lu_solve(D, R.astype(dt).T)  # D⁻¹ Rᵀ  (n, d)
    return mm(X, Y).astype(K.dtype), _worse(dc, dd)  # (R D⁻¹ Kᵀ C⁻¹)ᵀ = C⁻¹ K D⁻¹ Rᵀ  (C, D symmetric)


@partial(jax.jit, static_argnames=("dt",))
def _emmet_gate(K, C0, lam_c, lam_u, lam_e, dt):
    X, D, _ = _emmet_parts(K, C0, lam_c, lam_u, lam_e, dt)
    return jnp.linalg.solve(D, X.T).astype(K.dtype)  # D⁻¹ Kᵀ C⁻¹  (n, d_k)


def emmet_increment(K: Array, R: Array, C0: Array, mom2_update_weight: float | Array = 1.0,
                    emmet_lambda: float | Array = 0.1, update_norm_lambda: float | Array = 0.0, *,
                    solve_dtype: DType = jnp.float64, return_diagnostics: bool = False):
    """EMMET kernel increment ``Δᵀ`` (d_k, d_model) with ``Δ = R D⁻¹ Kᵀ C⁻¹``.

    K (d_k, n_req) keys, R (d_model, n_req) residuals, C0 (d_k, d_k); ``C = λ_C C0 + λ_u I``,
    ``D = Kᵀ C⁻¹ K + λ_E I`` (λ_E only when more than one key column is non-zero; zero columns are
    padding and leave Δ unchanged).  docs/FORMULAS.md §4 "EMMET" (UM ``emmet/emmet_main.py``).
    Raises ValueError on shape mismatch.  With ``return_diagnostics`` returns ``(inc, SolveDiagnostics)``
    (the worse of the C and D solves)."""
    lams = (mom2_update_weight, emmet_lambda, update_norm_lambda)
    with checked_scope(solve_dtype, K, R, scalars=lams, C0=C0) as dt:
        inc, diag = _emmet_increment(K, R, C0, mom2_update_weight, update_norm_lambda, emmet_lambda, dt)
    return (inc, diag) if return_diagnostics else inc


def emmet_gate(K: Array, C0: Array, mom2_update_weight: float | Array = 1.0, emmet_lambda: float | Array = 0.1,
               update_norm_lambda: float | Array = 0.0, *, solve_dtype: DType = jnp.float64) -> Array:
    """EMMET gate ``B = D⁻¹ Kᵀ C⁻¹`` (n_req, d_k), so that ``Δ = R B`` (docs/FORMULAS.md §4 "EMMET", §6)."""
    lams = (mom2_update_weight, emmet_lambda, update_norm_lambda)
    with checked_scope(solve_dtype, K, scalars=lams, C0=C0) as dt:
        return _emmet_gate(K, C0, mom2_update_weight, update_norm_lambda, emmet_lambda, dt)


@dataclasses.dataclass(frozen=True)
class EMMET(Editor):
    """EMMET (docs/FORMULAS.md §4 "EMMET"; BASELINES.md §7): equality-constrained batched update.

    mom2_update_weight: λ_C of C = λ_C C0 + λ_u I (UM: GPT-2 XL 1000, GPT-J 1, Llama-2 1).
    emmet_lambda: λ_E added to the diagonal of D = Kᵀ C⁻¹ K when the batch has > 1 request (UM 0.1).
    update_norm_lambda: λ_u (UM 0).
    """

    name: ClassVar[str] = "emmet"
    needs: ClassVar[frozenset[str]] = frozenset({"C0"})
    reference: ClassVar[str] = "scalable-model-editing/unified-model-editing emmet/emmet_main.py"

    solve_dtype: str = "float64"
    mom2_update_weight: float = 1.0
    emmet_lambda: float = 0.1
    update_norm_lambda: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for f in ("mom2_update_weight", "emmet_lambda", "update_norm_lambda"):
            if not getattr(self, f) >= 0:
                raise ValueError(f"editor.emmet.{f} must be >= 0, got {getattr(self, f)}")
        if self.mom2_update_weight == 0 and self.update_norm_lambda == 0:
            raise ValueError("editor.emmet.mom2_update_weight and update_norm_lambda are both 0: C = 0 is singular")

    def _args(self):
        return (self.mom2_update_weight, self.emmet_lambda, self.update_norm_lambda)

    def increment(self, K, R, slot, stats, K_bare=None):
        return emmet_increment(K, R, stats.C0[slot], *self._args(), solve_dtype=self.dtype, return_diagnostics=True)

    def gate(self, K, slot, stats, K_bare=None):
        return emmet_gate(K, stats.C0[slot], *self._args(), solve_dtype=self.dtype)


EDITOR = EMMET
