"""ROME: rank-one, one-layer update (docs/FORMULAS.md §4 "ROME"; BASELINES.md §1).

Public code followed: kmeng01/rome ``rome/compute_u.py`` (left vector u), ``rome/compute_v.py``
(right vector and the division by ``uᵀ k*``), ``rome/rome_main.py`` (requests applied one at a time).

For one request with template-averaged key ``k̄`` (the **uniform** mean over the rewriting rows,
``key_average = "uniform"``), bare-prompt key ``k*`` (``uses_bare_keys``) and residual
``r = z − h(k*)``:

    u = C0⁻¹ k̄            (mom2_adjustment; else u = k̄)
    Δ = r uᵀ / (uᵀ k*)     (d_model, d_k), so that Δ k* = r exactly

Several columns (n_req > 1, e.g. a padded batch) give the sum of the per-column rank-one updates,
``Δ = Σ_j r_j B_j`` with the gate row ``B_j = u_jᵀ / (u_jᵀ k*_j)`` (n_req, d_k); a column whose key is
zero (padding) has ``B_j = 0``.  ``one_at_a_time``: the runner writes requests one by one, each on the
model edited by the previous ones (``rome_main.py`` applies every Δ immediately).

Stage I follows ``compute_v.py``'s conventions through ``stage1_norm_ref = "mlp"``: the clamp
(``clamp_norm_factor``, 4 in the reference) and the weight decay are relative to ‖m_0‖, block L's MLP
output at the bare prompt's subject-last token (docs/FORMULAS.md §3 "Norm reference").  Its 21 context
templates ("{}" + 10 of 5 tokens + 10 of 10) come from ``templates.lengths`` (the paper-model presets).

The reference inverts C0 in float32 (``torch.inverse``); ``solve_dtype`` defaults to float64 here
because small-corpus C0 (the SmolLM2 demo) is ill-conditioned — set ``solve_dtype="float32"`` for the
reference's precision.  The normalisation of u in the reference cancels in Δ and is omitted.
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


def _no_solve(dt) -> SolveDiagnostics:
    return SolveDiagnostics(jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32),
                            jnp.asarray(jnp.finfo(dt).eps, jnp.float32))


@partial(jax.jit, static_argnames=("dt",))
def _rome_gate(K, K_bare, C0, dt):
    Kd, Kb = K.astype(dt), K_bare.astype(dt)
    if C0 is None:
        U, diag = Kd, _no_solve(dt)
    else:
        U, diag = lu_solve(C0.astype(dt), Kd)  # u_j = C0⁻¹ k̄_j   (d_k, n)
    den = jnp.sum(U * Kb, axis=0)  # u_jᵀ k*_j   (n,)
    ok = den != 0  # padding columns: zero keys
    B = jnp.where(ok[:, None], U.T / jnp.where(ok, den, 1.0)[:, None], 0.0)  # (n, d_k)
    return B, diag


def rome_gate(K: Array, K_bare: Array | None = None, C0: Array | None = None, *,
              solve_dtype: DType = jnp.float64, return_diagnostics: bool = False):
    """ROME gate ``B`` (n_req, d_k), row j = ``u_jᵀ / (u_jᵀ k*_j)`` with ``u_j = C0⁻¹ k̄_j``.

    K: averaged keys k̄ (d_k, n_req); K_bare: bare-prompt keys k* (d_k, n_req), ``None`` = K;
    C0: (d_k, d_k) second moment, ``None`` = no mom2 adjustment (u = k̄).  Zero key columns give zero rows.
    docs/FORMULAS.md §4 "ROME" (kmeng01/rome ``compute_u.py``, ``compute_v.py``).  Raises ValueError on
    shape mismatch.  With ``return_diagnostics`` returns ``(B, SolveDiagnostics)`` of the C0 solve."""
    if K_bare is None:
        K_bare = K
    if K_bare.shape != K.shape:
        raise ValueError(f"K_bare {K_bare.shape} must have the shape of K {K.shape}")
    with checked_scope(solve_dtype, K, K_bare, C0=C0) as dt:
        B, diag = _rome_gate(K, K_bare, C0, dt)
    B = B.astype(K.dtype)
    return (B, diag) if return_diagnostics else B


def rome_increment(K: Array, R: Array, K_bare: Array | None = None, C0: Array | None = None, *,
                   solve_dtype: DType = jnp.float64, return_diagnostics: bool = False):
    """ROME kernel increment ``Δᵀ`` (d_k, d_model), ``Δ = Σ_j r_j u_jᵀ / (u_jᵀ k*_j)``.

    K (d_k, n_req): averaged keys k̄; R (d_model, n_req): residuals r = z − h at the bare prompt;
    K_bare (d_k, n_req): bare-prompt keys k* (``None`` = K); C0 (d_k, d_k) or ``None`` (u = k̄).
    For a single column ``Δ k* = r``.  docs/FORMULAS.md §4 "ROME".  Raises ValueError on shape mismatch."""
    with checked_scope(solve_dtype, K, R, scalars=(K_bare,), C0=C0) as dt:
        B, diag = rome_gate(K, K_bare, C0, solve_dtype=dt, return_diagnostics=True)
        inc = _times_gate(R, B, dt)
    inc = inc.astype(K.dtype)
    return (inc, diag) if return_diagnostics else inc


@partial(jax.jit, static_argnames=("dt",))
def _times_gate(R, B, dt):
    return mm(B.astype(dt).T, R.astype(dt).T)  # (R B)ᵀ  (d_k, d)


def default_layer(run_layers: tuple[int, ...]) -> int:
    """ROME's single layer when ``editor.rome.layers`` is unset: the lower median of the run's layers.

    The run's layers are MEMIT's critical window; ROME edits one layer inside it (reference: GPT-J 5 in
    3–8, Llama-3 5 in 4–8 — the lower median gives 5 and 6; GPT-2 XL 17 in 13–17).  The paper-model
    configs set the reference layer explicitly."""
    ls = tuple(run_layers)
    return ls[(len(ls) - 1) // 2]


@dataclasses.dataclass(frozen=True)
class ROME(Editor):
    """ROME (docs/FORMULAS.md §4 "ROME"; BASELINES.md §1): rank one, one layer, one request at a time.

    mom2_adjustment: u = C0⁻¹ k̄ (reference GPT-2 XL, GPT-J) — false: u = k̄ (AE Llama-3).
    layers: the ONE edited layer; unset: the lower median of the run's layers (``default_layer``).
    """

    name: ClassVar[str] = "rome"
    needs: ClassVar[frozenset[str]] = frozenset({"C0"})
    key_average: ClassVar[str] = "uniform"
    uses_bare_keys: ClassVar[bool] = True
    one_at_a_time: ClassVar[bool] = True
    stage1_norm_ref: ClassVar[str] = "mlp"  # compute_v.py: clamp and weight decay relative to ‖m_0‖
    reference: ClassVar[str] = "kmeng01/rome rome/rome_main.py, rome/compute_u.py, rome/compute_v.py"

    solve_dtype: str = "float64"
    mom2_adjustment: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is not None and len(self.layers) != 1:
            raise ValueError(f"editor.rome.layers must name one layer (ROME is single-layer), got {self.layers}")

    def edit_layers(self, run_layers: tuple[int, ...]) -> tuple[int, ...]:
        return self.layers if self.layers is not None else (default_layer(run_layers),)

    def _c0(self, stats: LayerStats, slot: Array | int) -> Array | None:
        return stats.C0[slot] if self.mom2_adjustment else None

    def increment(self, K, R, slot, stats, K_bare=None):
        return rome_increment(K, R, K_bare, self._c0(stats, slot), solve_dtype=self.dtype, return_diagnostics=True)

    def gate(self, K, slot, stats, K_bare=None):
        return rome_gate(K, K_bare, self._c0(stats, slot), solve_dtype=self.dtype)


EDITOR = ROME
