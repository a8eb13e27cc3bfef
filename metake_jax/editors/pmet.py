"""PMET: joint attention + FFN targets, the FFN written (docs/FORMULAS.md §4 "PMET"; BASELINES.md §4).

Follows xpq-tech/BLUE ``pmet/compute_zs.py`` (Stage I) and ``pmet/pmet_main.py`` (update), the same
computation as the official xpq-tech/PMET ``edit/pmet/``:

* Stage I (``metake_jax.targets.optimize_attn_ffn_targets``): δ_attn and δ_mlp added to block L's
  attention output and FFN output at the subject's last token, optimised jointly; only
  z = m0 + δ_mlp (FFN-output space) is written.
* Write, per edited layer t of m on the partly edited model (``metake_jax.write.multilayer_write``):
  ``R = Z − M_L`` with M_L the **FFN output** of layer L at the bare prompt (not the block output),
  ``Δ_t = (R / √(m − t)) Kᵀ (K Kᵀ + λ C0)⁻¹`` in float64 (``use_cache``: + C_p inside the inverse, as
  ``PMET_seq``).

Not MetaKE-eligible: the update is linear in R, but its targets and residual live in FFN-output space
while MetaKE's look-ahead refines block-output targets through the residual stream (BASELINES.md §4
pitfalls); composing the two needs an FFN-space look-ahead, which is not implemented.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from metake_jax.editors.base import Editor, LayerStats, NotGatedError
from metake_jax.editors.memit import memit_increment

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PMET(Editor):
    """PMET (docs/FORMULAS.md §4 "PMET").

    mom2_update_weight: λ of ``(K Kᵀ + λ C0)⁻¹`` (BLUE hparams: 10000 GPT-2 XL, 15000 GPT-J / Llama-3;
        official PMET GPT-J 6000).
    nll_loss_factor: weight of the NLL in Stage I (0.1× once the target is the argmax everywhere).
    use_cache: add C_p inside the inverse (``PMET_seq``).
    """

    name: ClassVar[str] = "pmet"
    needs: ClassVar[frozenset[str]] = frozenset({"C0"})
    gated: ClassVar[bool] = False
    targets: ClassVar[str] = "attn_ffn"
    reference: ClassVar[str] = "xpq-tech/BLUE pmet/compute_zs.py, pmet/pmet_main.py (= xpq-tech/PMET)"
    nonnegative: ClassVar[tuple[str, ...]] = ("mom2_update_weight",)

    solve_dtype: str = "float64"
    mom2_update_weight: float = 15000.0
    nll_loss_factor: float = 1.0
    use_cache: bool = False

    def residual_divisor(self, m: int, t: Array | int) -> Array:
        """√(m − t) (BASELINES.md §4 "Update")."""
        return jnp.sqrt(jnp.asarray(m - t, jnp.float32))

    def increment(self, K, R, slot, stats: LayerStats, K_bare=None):
        """``Δᵀ = (R Kᵀ (K Kᵀ + λ C0 [+ C_p])⁻¹)ᵀ`` (d_k, d_model), float64 solve; R already divided."""
        return memit_increment(K, R, stats.C0[slot], self.mom2_update_weight,
                               stats.Cp[slot] if self.use_cache else None,
                               solve_dtype=self.dtype, return_diagnostics=True)

    def gate(self, K, slot, stats, K_bare=None):
        raise NotGatedError("editor 'pmet' is not gated for MetaKE: its targets and residual live in "
                            "FFN-output space, MetaKE's look-ahead refines block-output targets")


EDITOR = PMET
