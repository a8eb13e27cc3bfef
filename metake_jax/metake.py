"""MetaKE: bi-level refinement of the targets through the Structural Gradient Proxy (METHOD.md §6).

Per batch, the gate ``G`` of the final edited layer ``L`` is computed once and frozen.  The
virtual look-ahead ``Δ_L(Z) = (Z − H_L) K_Lᵀ G`` (eq. 8) changes layer L's FFN output weight, and
the virtual model (that weight at every position) is scored with

    ℓ_meta(Z) = ℓ_edit + ℓ_loc + ‖Z − Z⁽⁰⁾‖²            (eq. 7, unit weights by default)

``jax.grad`` of ℓ_meta through the closed form *is* the proxy gradient (eq. 9).  T outer steps
``Z ← Z − η ∇ℓ_meta`` run inside one ``lax.scan``.

Ablations (Table 2) are switches of ``MetaKEConfig``:
* ``steps=0``                 — w/o bi-level (plain AlphaEdit / MEMIT targets);
* ``gate="keyonly"``          — w/o structural gate: ``(K_L K_Lᵀ + λI)⁻¹`` (P_L and C_p dropped);
* ``stop_grad=True``          — stop-grad feedback: the loss is evaluated on the virtual model but
  ``Δ_L`` is detached; the gradient then reaches Z straight through the subject-position
  representation (Z enters as ``Z − sg(Z)`` added at the subject's last token of layer L), i.e.
  the task signal without the gate.  (The paper gives no formula for this variant; this is our
  reading: with Δ_L detached and nothing else, ∇_Z ℓ_meta would be the anchor term alone.)
``inner="memit"`` uses the MEMIT gate ``(λC₀ + KKᵀ)⁻¹`` (MetaKE over MEMIT).
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

from metake_jax import editors
from metake_jax.batch import EditBatch
from metake_jax.keys import keys_and_hidden
from metake_jax.targets import edit_and_loc_losses, lower_hidden, rows_of, upper_logits
from metake_jax.write import EditorConfig, LayerStats, gate as editor_gate
from models.config import ModelConfig
from models.interface import WDeltas

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class MetaKEConfig:
    steps: int = 15  # T (paper Table 3)
    lr: float = 0.5  # η (tuned on SmolLM2; see bench/RESULTS.md)
    gate: str = "structural"  # "structural" | "keyonly"
    stop_grad: bool = False
    edit_weight: float = 1.0
    loc_weight: float = 1.0
    anchor_weight: float = 1.0
    # Which rewriting prompts score ℓ_edit on the virtual model: "all" context templates (as
    # Stage I) or only the "bare" prompt (plus the KL prompt) — 7→2 rows per request, a ~3.5×
    # cheaper look-ahead.
    prompts: str = "all"

    def __post_init__(self) -> None:
        if self.gate not in ("structural", "keyonly"):
            raise ValueError(f"unknown MetaKE gate {self.gate!r} (structural | keyonly)")
        if self.prompts not in ("all", "bare"):
            raise ValueError(f"unknown MetaKE prompts {self.prompts!r} (all | bare)")


class LookaheadContext(NamedTuple):
    """Everything the virtual look-ahead needs, frozen for the batch."""

    G: Array  # (d_k, d_k) gate of layer L
    K_L: Array  # (d_k, n_pad)
    H_L: Array  # (d, n_pad)
    h_in: Array  # (R, T, d) hidden states entering L
    logp_init: Array  # (R, V) pre-edit log-probs at each row's subject-last token


def frozen_gate(K_L: Array, stats: LayerStats, ecfg: EditorConfig, mcfg: MetaKEConfig) -> Array:
    """G of the final edited layer (slot m-1), or the key-only ablation gate."""
    if mcfg.gate == "keyonly":
        return editors.keyonly_gate(K_L, ecfg.l2)
    return editor_gate(K_L, stats.Cp.shape[0] - 1, stats, ecfg)


def lookahead_increment(ctx: LookaheadContext, Z: Array, valid: Array) -> Array:
    """Virtual look-ahead Δ_L(Z)ᵀ = ((Z − H_L) K_Lᵀ G)ᵀ in the (d_k, d) kernel layout (eq. 8)."""
    return editors.increment_from_gate(ctx.K_L, (Z - ctx.H_L) * valid, ctx.G)


def prepare_lookahead(
    cfg: ModelConfig, params: Any, batch: EditBatch, layers: tuple[int, ...], stats: LayerStats,
    ecfg: EditorConfig, mcfg: MetaKEConfig, look_batch: EditBatch | None = None,
) -> LookaheadContext:
    """Gate and keys from the full ``batch``; cached hidden states for the rows that score the
    virtual model (``look_batch``, default the full batch)."""
    L = layers[-1]
    lb = batch if look_batch is None else look_batch
    K, H = keys_and_hidden(cfg, params, batch, layers)
    h_in = lower_hidden(cfg, params, lb, L)
    _, logits_k0 = upper_logits(cfg, params, lb, h_in, L)
    return LookaheadContext(
        G=frozen_gate(K[-1], stats, ecfg, mcfg), K_L=K[-1], H_L=H, h_in=h_in,
        logp_init=jax.nn.log_softmax(logits_k0, axis=-1),
    )


def virtual_losses(
    cfg: ModelConfig, params: Any, batch: EditBatch, L: int, ctx: LookaheadContext, Z: Array,
    mcfg: MetaKEConfig,
) -> tuple[Array, Array]:
    """Per-request (ℓ_edit, ℓ_loc) on the virtual model W_L + Δ_L(Z)."""
    inc = lookahead_increment(ctx, Z, batch.valid)
    delta_rows = None
    if mcfg.stop_grad:
        inc = jax.lax.stop_gradient(inc)
        delta_rows = rows_of(batch, (Z - jax.lax.stop_gradient(Z)).T)
    logits_t, logits_k = upper_logits(
        cfg, params, batch, ctx.h_in, L, delta_rows=delta_rows, w_out=WDeltas((L,), inc[None]),
    )
    return edit_and_loc_losses(logits_t, logits_k, batch, ctx.logp_init)


def meta_loss(
    cfg: ModelConfig, params: Any, batch: EditBatch, L: int, ctx: LookaheadContext, Z: Array,
    Z0: Array, mcfg: MetaKEConfig,
) -> tuple[Array, Array]:
    """ℓ_meta summed over real requests, and the per-request values (eq. 7)."""
    edit, loc = virtual_losses(cfg, params, batch, L, ctx, Z, mcfg)
    anchor = jnp.sum(jnp.square(Z - Z0), axis=0)
    per = mcfg.edit_weight * edit + mcfg.loc_weight * loc + mcfg.anchor_weight * anchor
    return jnp.sum(per * batch.valid), per


class RefineResult(NamedTuple):
    Z: Array  # (d, n_pad) refined targets Z^(T)
    losses: Array  # (T + 1, n_pad) per-request ℓ_meta along the refinement (last: at Z^(T))


@partial(jax.jit, static_argnames=("cfg", "layers", "ecfg", "mcfg"))
def refine_targets(
    cfg: ModelConfig, params: Any, batch: EditBatch, Z0: Array, layers: tuple[int, ...],
    stats: LayerStats, ecfg: EditorConfig, mcfg: MetaKEConfig, look_batch: EditBatch | None = None,
) -> RefineResult:
    """T steps of Z ← Z − η ∇_Z ℓ_meta with the frozen gate (Algorithm 1), one jitted scan.

    ``look_batch``: the rows scoring the virtual model (``select_rows`` of ``batch``), default all.
    """
    chex.assert_shape(Z0, (cfg.d_model, batch.valid.shape[0]))
    L = layers[-1]
    lb = batch if look_batch is None else look_batch
    ctx = prepare_lookahead(cfg, params, batch, layers, stats, ecfg, mcfg, lb)
    grad_fn = jax.value_and_grad(lambda z: meta_loss(cfg, params, lb, L, ctx, z, Z0, mcfg), has_aux=True)

    def step(Z, _):
        (_, per), g = grad_fn(Z)
        return Z - mcfg.lr * g * batch.valid, per

    Z, curve = jax.lax.scan(step, Z0, None, length=mcfg.steps)
    _, last = meta_loss(cfg, params, lb, L, ctx, Z, Z0, mcfg)
    return RefineResult(Z=Z, losses=jnp.concatenate([curve, last[None]], axis=0))
