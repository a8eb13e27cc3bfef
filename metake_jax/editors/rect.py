"""RECT over MEMIT (docs/FORMULAS.md §B3; BASELINES.md §3 — AE ``memit/memit_rect_main.py``, the same
rule as SP ``memit/memit_rect_main.py``; the keep fraction of RE ``easyeditor/models/rome/rome_main.py``).

The batch is solved exactly as MEMIT (λ_C C0 solve in float64, residual split 1/(m − t), later layers
reading the earlier layers' *unmasked* increments, as AE does).  After the write each layer's increment
is masked element-wise by its relative change against the layer's weight before this batch:

    ρ_ij = |Δ_ij / (W_ij + 1e-8)|          (W signed, as the reference: ε added, not |W| + ε)
    τ    = the k-th smallest ρ, k = ⌊(1 − keep)·N⌋  (1-indexed; N = d_k·d entries of the layer)
    Δ'_ij = Δ_ij if ρ_ij ≥ τ else 0       (ties at τ kept; k = 0 keeps everything)

``keep``: 0.4 in AE/SP/BL (hard-coded ``k_percent = 40``, the default here); 0.2 in the RECT paper and
RE.  Element-wise, so the masked update is neither low rank nor of the form Δ = R·B(K): not gated.
"""
from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import ClassVar

import jax
import jax.numpy as jnp

from metake_jax.editors.base import Editor
from metake_jax.editors.memit import MEMIT

Array = jax.Array

#: ε of the reference's relative change |Δ / (W + ε)|
RECT_EPS = 1e-8


def rect_rank(keep: float, n_entries: int) -> int:
    """k = ⌊(1 − keep)·N⌋: the 1-indexed rank of the threshold τ among the N relative changes (0: keep all)."""
    return int(math.floor((1.0 - keep) * n_entries))


@partial(jax.jit, static_argnames=("keep",))
def rect_mask(deltas: Array, W: Array, keep: float) -> Array:
    """RECT's mask of increments ``deltas`` (m, d_k, d) against the kernels ``W`` (m, d_k, d) before the
    batch: per layer, keep the entries whose |Δ/(W + 1e-8)| is at or above the ⌊(1−keep)·N⌋-th smallest.

    Layout-free (element-wise), so the Flax (in, out) kernels give the reference's out×in result
    transposed.  docs/FORMULAS.md §B3; BASELINES.md §3."""
    m = deltas.shape[0]
    rho = jnp.abs(deltas / (W.astype(deltas.dtype) + RECT_EPS)).reshape(m, -1)
    k = rect_rank(keep, rho.shape[1])
    if k <= 0:
        return deltas
    tau = jnp.sort(rho, axis=1)[:, k - 1]
    return jnp.where((rho >= tau[:, None]).reshape(deltas.shape), deltas, jnp.zeros_like(deltas))


@dataclasses.dataclass(frozen=True)
class RECT(MEMIT):
    """RECT: MEMIT, then each layer's increment keeps only its top relative changes (docs/FORMULAS.md §B3).

    keep: fraction of entries kept per layer, in (0, 1] (AE/SP 0.4, the default; paper/RE 0.2);
    1 gives MEMIT exactly.  Raises ValueError naming ``editor.rect.keep`` outside (0, 1].
    Other fields: MEMIT's (``mom2_update_weight``, ``use_cache``, ``solve_dtype``).
    """

    name: ClassVar[str] = "rect"
    gated: ClassVar[bool] = False
    reference: ClassVar[str] = "jianghoucheng/AlphaEdit memit/memit_rect_main.py (MEMIT_rect)"

    keep: float = 0.4

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < float(self.keep) <= 1.0:
            raise ValueError(f"editor.rect.keep must be in (0, 1], got {self.keep!r}")

    gate = Editor.gate  # the mask makes the update nonlinear in R: not Δ = R·B(K)
    association = Editor.association

    def finalize(self, deltas: Array, W: Array) -> Array:
        return rect_mask(deltas, W, float(self.keep))


EDITOR = RECT
