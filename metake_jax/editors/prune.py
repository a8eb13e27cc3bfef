"""PRUNE over MEMIT (docs/FORMULAS.md §B2; BASELINES.md §2 — SP ``experiments/evaluate.py`` (its
``MEMIT_prune`` branch, the restraint written at each save step), the same rule as AE ``MEMIT_prune`` and
PR ``easyeditor/editors/bi_editor_loadw.py``).

The editing stream is plain MEMIT (no restraint, no C_p): every batch is written on the unrestrained
weights.  What is *evaluated and exported* is the restrained model (``readout``), per edited layer:

    Δ_acc = W − W0 = U diag(σ) Vᵀ        (reduced SVD of the accumulated edit)
    σ̄     = σ_max(W0)                     (largest singular value of the unedited weight)
    σ'_i  = σ_i                            if σ_i ≤ σ̄   (SP/AE keep ties; PR uses <)
          = log_α σ_i − log_α σ̄ + σ̄       otherwise    (α = e in SP/AE; PR also 1.2, 1.5, 2)
    W_eval = W0 + U diag(σ') Vᵀ

This follows SP, which restrains a copy of Δ_acc after each batch for its evaluation checkpoints while
the model in memory keeps evolving unrestrained (PR likewise restrains once, post hoc, at each
checkpoint).  AE restrains only after the final batch and then writes it onto the *current* weight
(W0 + Δ_acc + Δ'_acc, BASELINES.md §2 pitfalls) — not followed.  Singular values and transposition are
layout-free, so the Flax (in, out) kernels give the reference's result transposed.
The restraint is nonlinear in Δ_acc (hence in R): not gated.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from metake_jax.editors.base import Editor
from metake_jax.editors.memit import MEMIT

Array = jax.Array


@jax.jit
def restrain_singular_values(sigma: Array, sigma_bar: Array, alpha: float | Array) -> Array:
    """PRUNE's σ' (same shape as ``sigma``): σ where σ ≤ σ̄, else log_α σ − log_α σ̄ + σ̄.

    ``sigma`` (..., r) singular values, ``sigma_bar`` (...,) their bounds, ``alpha`` > 1 the log base.
    docs/FORMULAS.md §B2."""
    sb = jnp.asarray(sigma_bar, sigma.dtype)[..., None]
    la = jnp.log(jnp.asarray(alpha, sigma.dtype))
    over = sigma > sb
    safe = jnp.where(over, sigma, jnp.ones_like(sigma))  # log of σ only where it is used
    return jnp.where(over, (jnp.log(safe) - jnp.log(sb)) / la + sb, sigma)


@jax.jit
def prune_readout(W: Array, W0: Array, alpha: float | Array) -> Array:
    """The restrained kernels W0 + U diag(σ') Vᵀ (m, d_k, d) of the accumulated edits W − W0 (m, d_k, d).

    σ̄ = σ_max(W0) per layer; a layer none of whose σ exceeds σ̄ is returned as ``W`` itself (no SVD
    round-off), so an unbounded restraint is the identity.  Computed in the dtype of ``W``.
    docs/FORMULAS.md §B2; BASELINES.md §2."""
    W0 = W0.astype(W.dtype)
    D = W - W0
    U, s, Vt = jnp.linalg.svd(D, full_matrices=False)
    sigma_bar = jnp.linalg.svd(W0, compute_uv=False)[..., 0]
    s2 = restrain_singular_values(s, sigma_bar, alpha)
    restrained = W0 + jnp.einsum("mir,mr,mrj->mij", U, s2, Vt, precision=jax.lax.Precision.HIGHEST)
    any_over = jnp.any(s > sigma_bar[:, None], axis=1)
    return jnp.where(any_over[:, None, None], restrained, W)


@dataclasses.dataclass(frozen=True)
class PRUNE(MEMIT):
    """PRUNE: the stream is MEMIT; evaluations and exports read the restrained weights (docs/FORMULAS.md §B2).

    alpha: base of the log compression of singular values above σ_max(W0), > 1 (default e, as SP/AE;
    PR's ``log1_2``/``log1_5``/``log2`` are 1.2/1.5/2).  Raises ValueError naming ``editor.prune.alpha``
    otherwise.  Other fields: MEMIT's (``mom2_update_weight``, ``use_cache``, ``solve_dtype``).
    """

    name: ClassVar[str] = "prune"
    gated: ClassVar[bool] = False
    reference: ClassVar[str] = "PlusLabNLP/SPHERE experiments/evaluate.py (MEMIT_prune)"

    alpha: float = math.e

    def __post_init__(self) -> None:
        super().__post_init__()
        if not float(self.alpha) > 1.0:
            raise ValueError(f"editor.prune.alpha must be > 1 (the log base), got {self.alpha!r}")

    gate = Editor.gate  # the evaluated weights are a nonlinear function of Δ_acc: not Δ = R·B(K)
    association = Editor.association

    def readout(self, W: Array, W0: Array) -> Array:
        return prune_readout(W, W0, float(self.alpha))


EDITOR = PRUNE
