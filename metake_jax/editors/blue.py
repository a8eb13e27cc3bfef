"""AlphaEdit-BLUE: boundary-layer AlphaEdit (docs/FORMULAS.md §4 "AlphaEdit-BLUE"; BASELINES.md §5).

Follows xpq-tech/BLUE ``AlphaEdit/AlphaEdit_main.py`` (the BLUE branch) with its
``hparams/AlphaEdit/*-blue.json``.  Only the **first and last** layers of the run's critical range are
edited (GPT-2 XL [13, 17], GPT-J [3, 8], Llama-3-8B [4, 8]), unless ``layers`` is set.  For each boundary
layer l, in order, on the model as edited so far in the batch (``metake_jax.editor.edit_per_layer``):

1. Stage I at layer l (δ added to block l's output, AlphaEdit's loss and hyper-parameters): Z_l;
2. R_l = Z_l − H_l (block-l output at the bare prompt), **not divided** by the number of layers left;
3. ``Δ_l = R_l K_lᵀ P_l ((K_l K_lᵀ + C_p,l) P_l + L2·I)⁻¹`` (AlphaEdit's solve, float32), applied at once;

then C_p,l += K_l K_lᵀ for both layers, keys recomputed on the edited model.  L2 per model: 80 (GPT-2 XL),
95 (GPT-J), 1 (Llama-3-8B).

Not MetaKE-eligible: the look-ahead refines one target Z at the last layer and freezes one gate per
layer; here every layer has its own target, optimised on a model that already carries the earlier
layer's write — the targets of the later layer are a function of the earlier write, so no single
frozen Δ = R·B(K) over the whole batch exists (docs/FORMULAS.md §6).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from metake_jax.editors.alphaedit import alphaedit_increment, association
from metake_jax.editors.base import Editor, LayerStats, NotGatedError

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AlphaEditBLUE(Editor):
    """AlphaEdit at the boundary layers with per-layer Stage I targets and undivided residuals.

    l2: λ of ``P (K Kᵀ + C_p) + λ I`` (BLUE reference 80 / 95 / 1 for GPT-2 XL / GPT-J / Llama-3-8B;
        the default is Llama-3's, the family of the demo model).
    layers: edited layers; unset = first and last of the run's ``layers``.
    """

    name: ClassVar[str] = "blue"
    needs: ClassVar[frozenset[str]] = frozenset({"P"})
    gated: ClassVar[bool] = False
    per_layer_targets: ClassVar[bool] = True
    reference: ClassVar[str] = "xpq-tech/BLUE AlphaEdit/AlphaEdit_main.py (BLUE branch)"
    nonnegative: ClassVar[tuple[str, ...]] = ("l2",)

    solve_dtype: str = "float32"
    l2: float = 1.0

    def edit_layers(self, run_layers: tuple[int, ...]) -> tuple[int, ...]:
        """The boundary layers: ``layers`` if set, else (first, last) of the run's layers.

        Raises ValueError for an empty ``run_layers``."""
        if self.layers is not None:
            return self.layers
        run_layers = tuple(int(x) for x in run_layers)
        if not run_layers:
            raise ValueError("editor.blue needs at least one run layer")
        return tuple(sorted({run_layers[0], run_layers[-1]}))

    def residual_divisor(self, m: int, t: Array | int) -> Array:
        """BLUE writes each layer's residual undivided (BASELINES.md §5 step 2)."""
        return jnp.asarray(1.0, jnp.float32)

    def increment(self, K, R, slot, stats: LayerStats, K_bare=None):
        """AlphaEdit's kernel increment (d_k, d_model) with that layer's P and C_p (BASELINES.md §5 step 3)."""
        return alphaedit_increment(K, R, stats.P[slot], stats.Cp[slot], self.l2, solve_dtype=self.dtype,
                                   return_diagnostics=True)

    def gate(self, K, slot, stats, K_bare=None):
        raise NotGatedError("editor 'blue' is not gated: its targets are re-optimised per layer on the "
                            "partly edited model, so MetaKE cannot refine one target through a frozen gate")

    def association(self, K, slot, stats):
        """AlphaEdit's per-request association with that layer's P and C_p (docs/FORMULAS.md §5)."""
        return association(K, stats.P[slot], stats.Cp[slot], self.l2, solve_dtype=jnp.float64)


EDITOR = AlphaEditBLUE
