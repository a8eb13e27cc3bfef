"""MetaKE: bi-level refinement of the targets through the Structural Gradient Proxy (docs/FORMULAS.md §6).

Per batch, the gate ``B`` (n_req × d_key) of the final edited layer ``L`` — the editor's update is
``Δ = R·B(K)`` (``Editor.gate``; for AlphaEdit ``B = K_Lᵀ G`` with the structural gate
``G = P((K Kᵀ + C_p)P + λI)⁻¹``) — is computed once and frozen, so the virtual increment
``Δ_L(Z) = (Z − H_L) B`` (eq. 8) costs one (d_model × n_req)·(n_req × d_key) product per step.
MetaKE applies to every gated editor (``metake_jax.methods``).  The virtual model (that weight at every position) is scored with

    ℓ_meta,i(Z) = ℓ_edit,i + ℓ_loc,i + a · ‖z_i − z⁰_i‖² / s_i                 (eq. 7)

and ``jax.grad`` of Σ_i ℓ_meta,i through the closed form *is* the proxy gradient (eq. 9).

Units (docs/FORMULAS.md §6 "Units"): with ``anchor="relative"`` (default) ``s_i = ‖r⁰_i‖²``, the squared
planned residual ``r⁰_i = z⁰_i − h_L,i``, and the outer step is gradient descent in residual units,
``z_i ← z_i − η_i s_i g_i``; the refined Z is then invariant under a rescaling of the residual
stream.  ``anchor="absolute"`` is the literal reading (``s_i = 1``: anchor in hidden-state units,
``z_i ← z_i − η g_i``).  Armijo backtracking (``line_search``, c = 1e-4; ``outer_steps``) keeps the
batch's ℓ_meta (``"batch"``, default) or every request's ℓ_meta,i (``"request"``) from rising.  T
outer steps run inside one ``lax.scan``; an accepted trial's loss and gradient are reused by the next
step, so a step whose first trial is accepted costs one value-and-gradient, as plain gradient descent
does.

Ablations (Table 2) are switches of ``MetaKEConfig``:
* ``steps=0``              — w/o bi-level (plain AlphaEdit / MEMIT targets);
* ``gate="keyonly"``       — w/o structural gate: ``B = K_Lᵀ (K_L K_Lᵀ + λI)⁻¹`` (P_L and C_p dropped;
  λ = the editor's ``l2``);
* ``feedback="stopgrad"``  — stop-grad feedback: the virtual forward pass runs but ``Δ_L`` is
  detached, so only the anchor's gradient is left and Z⁽ᵀ⁾ = Z⁽⁰⁾ (the paper's stop-grad ≈ T = 0);
* ``feedback="ungated"``   — ungated feedback: ``Δ_L`` detached, and the task gradient reaches Z
  straight through the subject-position representation (Z enters as ``Z − sg(Z)`` added at the
  subject's last token of layer L), i.e. the task signal without the gate.
Over MEMIT (``method=metake_memit``) the gate is ``K_Lᵀ (λ_C C₀ + K Kᵀ)⁻¹``.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from metake_jax.batch import EditBatch
from metake_jax.editors import Editor, LayerStats
from metake_jax.editors.linalg import keyonly_gate, mm
from metake_jax.targets import group_rows, lower_hidden, row_groups, row_terms, upper_logits
from metake_jax.tokens import bucket
from metake_jax.write import editor_keys
from models.config import ModelConfig
from models.interface import WDeltas, forward, head, w_out

Array = jax.Array

ANCHORS = ("relative", "absolute")
FEEDBACKS = ("gated", "stopgrad", "ungated")
GATES = ("structural", "keyonly")
LINE_SEARCHES = ("batch", "request", "none")
ARMIJO_C = 1e-4  # sufficient-decrease constant of the backtracking line search


@dataclasses.dataclass(frozen=True)
class MetaKEConfig:
    """Hyper-parameters of the refinement (docs/FORMULAS.md §6).

    ``lr`` (η) is in residual units with ``anchor="relative"`` (a step of η moves z_i by
    η‖r⁰_i‖²‖g_i‖) and in hidden-state units per unit gradient with ``anchor="absolute"``.
    """

    steps: int = 15  # T (paper Table 3)
    lr: float = 3e-3  # η (residual units with anchor="relative"; tuned on SmolLM2, bench/RESULTS.md)
    gate: str = "structural"  # "structural" | "keyonly"
    feedback: str = "gated"  # "gated" | "stopgrad" | "ungated"
    anchor: str = "relative"  # "relative" (scale-invariant, default) | "absolute" (literal reading)
    line_search: str = "batch"  # Armijo backtracking: "batch" | "request" | "none" (see outer_steps)
    max_halvings: int = 8
    edit_weight: float = 1.0
    loc_weight: float = 1.0
    anchor_weight: float = 1.0  # a
    # Which rewriting prompts score ℓ_edit on the virtual model: "all" context templates (as
    # Stage I) or only the "bare" prompt (plus the KL prompt) — 7→2 rows per request, a ~3.5×
    # cheaper look-ahead.
    prompts: str = "all"

    def __post_init__(self) -> None:
        for field, allowed in (("gate", GATES), ("feedback", FEEDBACKS), ("anchor", ANCHORS),
                               ("prompts", ("all", "bare")), ("line_search", LINE_SEARCHES)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"metake.{field}={getattr(self, field)!r} is not one of {' | '.join(allowed)}")
        if self.steps < 0 or self.max_halvings < 0:
            raise ValueError(f"metake.steps and metake.max_halvings must be >= 0, got {self.steps}, "
                             f"{self.max_halvings}")
        if not self.lr > 0 or self.anchor_weight < 0:
            raise ValueError(f"metake.lr must be > 0 and metake.weights.anchor >= 0, got {self.lr}, "
                             f"{self.anchor_weight}")


class LookRows(NamedTuple):
    """The rows that score the virtual model, in length-sorted groups, each cut to its own width.

    The look-ahead runs every row at all positions (Δ_L changes layer L's output everywhere), so the
    padding of short rows (KL prompts) to the longest one (rewriting prompts) is pure cost; grouping
    changes no number (each row's terms are mapped back to its request exactly as ungrouped).

    groups:  per group j an ``EditBatch`` with the per-row fields only (tokens, mask (G_j, W_j), lookup,
             tgt_pos, tgt_ids, tgt_mask); the other fields None — or one ``PackedRows`` (``pack_look_rows``).
    nll_avg, kl_sel: (n_pad, R) request weights with columns in the groups' row order.
    rows:    (R,) index of each grouped row in the ungrouped batch (row r belongs to request r // per);
             None for packed rows (only the ``ungated`` ablation reads it).
    valid:   (n_pad,) 1.0 for real requests.
    """

    groups: tuple[EditBatch, ...]
    nll_avg: Any
    kl_sel: Any
    rows: Any
    valid: Any


def group_look_rows(batch: EditBatch, n_groups: int) -> LookRows:
    """Host side: ``batch`` (numpy or jax) split into ``n_groups`` length-sorted groups (``targets.row_groups``,
    widths bucketed to multiples of 4) as a ``LookRows`` of jax arrays."""
    host = EditBatch(*[None if x is None else np.asarray(x) for x in batch])
    order, widths = row_groups(host, n_groups)
    groups = tuple(EditBatch(*[None if x is None else jnp.asarray(x) for x in g])
                   for _, g in group_rows(host, order, widths))
    return LookRows(groups=groups, nll_avg=jnp.asarray(host.nll_avg[:, order]),
                    kl_sel=jnp.asarray(host.kl_sel[:, order]), rows=jnp.asarray(order), valid=jnp.asarray(host.valid))


class PackedRows(NamedTuple):
    """Look rows packed side by side into rows of one width (``pack_look_rows``): each original row is a
    contiguous segment with its own position ids, attending only within itself (``models.layers.make_context``),
    so every number is that of the row run alone, and the padding of short rows is gone.

    tokens, mask, segments: (P, W) packed rows (segment 0 = padding);
    tgt_pos:  (R_t, Tt) flat indices (p·W + position) of the target positions of the rows scored by ℓ_edit;
    tgt_ids, tgt_mask: (R_t, Tt) their target tokens;
    lookup:   (R_k,) flat index of the subject's last token of the rows scored by ℓ_loc (KL rows).
    """

    tokens: Any
    mask: Any
    segments: Any
    tgt_pos: Any
    tgt_ids: Any
    tgt_mask: Any
    lookup: Any


PACK_WIDTH = 32  # packed look-row width (tokens); wider rows keep their own width (bucketed by 4)


def pack_look_rows(batch: EditBatch, width: int = PACK_WIDTH) -> LookRows:
    """Host side: the real requests' rows of ``batch`` first-fit-decreasing packed into rows of ``width``
    tokens (at least the longest row, bucketed by 4; the number of packed rows bucketed by 2), as a
    ``LookRows`` with one ``PackedRows`` group; ``nll_avg`` / ``kl_sel`` keep only the columns of the rows
    ℓ_edit / ℓ_loc read (the others weigh 0).  Padding requests' rows are dropped (their ℓ is 0; they never
    count).  Not for ``feedback="ungated"`` (it adds a per-row delta at each row's subject token)."""
    host = EditBatch(*[None if x is None else np.asarray(x) for x in batch])
    per = host.tokens.shape[0] // host.valid.shape[0]
    rows = np.flatnonzero(np.repeat(host.valid > 0, per))
    lengths = host.mask[rows].sum(axis=1).astype(int)
    W = max(width, bucket(int(lengths.max()), minimum=1, multiple=4))
    fill: list[int] = []
    where, offset = np.zeros(len(rows), int), np.zeros(len(rows), int)
    for j in np.argsort(-lengths, kind="stable"):  # first fit decreasing
        b = next((b for b, used in enumerate(fill) if used + lengths[j] <= W), len(fill))
        if b == len(fill):
            fill.append(0)
        where[j], offset[j] = b, fill[b]
        fill[b] += lengths[j]
    P = bucket(len(fill), minimum=1, multiple=2)
    tokens = np.zeros((P, W), host.tokens.dtype)
    mask = np.zeros((P, W), bool)
    segments = np.zeros((P, W), np.int32)
    flat_of = np.zeros(host.tokens.shape, np.int64)  # (rows, T) flat packed index of each position
    for j, r in enumerate(rows):
        real = np.flatnonzero(host.mask[r])
        start = where[j] * W + offset[j]
        tokens.reshape(-1)[start:start + len(real)] = host.tokens[r, real]
        mask.reshape(-1)[start:start + len(real)] = True
        segments.reshape(-1)[start:start + len(real)] = j + 1
        rank = np.clip(np.cumsum(host.mask[r]) - 1, 0, len(real) - 1)  # a position's index among the real ones
        flat_of[r] = start + rank
    valid_cols = np.repeat(host.valid > 0, per)
    t_rows = rows[(host.nll_avg[:, rows] != 0).any(axis=0) & valid_cols[rows]]
    k_rows = rows[(host.kl_sel[:, rows] != 0).any(axis=0) & valid_cols[rows]]
    packed = PackedRows(
        tokens=jnp.asarray(tokens), mask=jnp.asarray(mask), segments=jnp.asarray(segments),
        tgt_pos=jnp.asarray(np.take_along_axis(flat_of[t_rows], host.tgt_pos[t_rows], axis=1).astype(np.int32)),
        tgt_ids=jnp.asarray(host.tgt_ids[t_rows]), tgt_mask=jnp.asarray(host.tgt_mask[t_rows]),
        lookup=jnp.asarray(flat_of[k_rows, host.lookup[k_rows]].astype(np.int32)))
    return LookRows(groups=(packed,), nll_avg=jnp.asarray(host.nll_avg[:, t_rows]),
                    kl_sel=jnp.asarray(host.kl_sel[:, k_rows]), rows=None, valid=jnp.asarray(host.valid))


def _look_lower(cfg: ModelConfig, params: Any, rows: EditBatch | PackedRows, L: int) -> Array:
    """Hidden states entering block L of one look-row group (plain or packed)."""
    if isinstance(rows, PackedRows):
        return forward(cfg, params, rows.tokens, rows.mask, stop_layer=L, segments=rows.segments).last_hidden
    return lower_hidden(cfg, params, rows, L)


def _look_upper(cfg: ModelConfig, params: Any, rows: EditBatch | PackedRows, h_in: Array, L: int, *,
                delta_rows: Array | None = None, w_out: WDeltas | None = None) -> tuple[Array, Array]:
    """Blocks L.. of one look-row group: (target logits (R_t, Tt, V), subject-token logits (R_k, V)); for a
    plain group R_t = R_k = its rows (``targets.upper_logits``)."""
    if not isinstance(rows, PackedRows):
        return upper_logits(cfg, params, rows, h_in, L, delta_rows=delta_rows, w_out=w_out)
    h = forward(cfg, params, None, rows.mask, h_start=h_in, start_layer=L, w_out_deltas=w_out,
                stop_layer=cfg.n_layers, segments=rows.segments).last_hidden
    flat = h.reshape(-1, h.shape[-1])
    return head(cfg, params, flat[rows.tgt_pos]), head(cfg, params, flat[rows.lookup])


def as_look_rows(batch: EditBatch | LookRows) -> LookRows:
    """``batch`` as ``LookRows``: unchanged if it is one, else one group of every row in its order."""
    if isinstance(batch, LookRows):
        return batch
    rows = EditBatch(tokens=batch.tokens, mask=batch.mask, lookup=batch.lookup, tgt_pos=batch.tgt_pos,
                     tgt_ids=batch.tgt_ids, tgt_mask=batch.tgt_mask, key_avg=None, nll_avg=None, kl_sel=None,
                     bare_row=None, valid=None)
    return LookRows(groups=(rows,), nll_avg=batch.nll_avg, kl_sel=batch.kl_sel,
                    rows=jnp.arange(batch.tokens.shape[0]), valid=batch.valid)


class LookaheadContext(NamedTuple):
    """Everything the virtual look-ahead needs, frozen for the batch."""

    B: Array  # (n_pad, d_k) the gate of layer L: Δ_L = R·B
    H_L: Array  # (d, n_pad) block-L output at the subject's last token (bare prompt)
    h_in: tuple[Array, ...]  # per look-row group j: (G_j, W_j, d) hidden states entering L
    logp_init: tuple[Array, ...]  # per group: (G_j, V) pre-edit log-probs at each row's subject-last token


def frozen_gate(K_L: Array, stats: LayerStats, editor: Editor, mcfg: MetaKEConfig,
                K_bare: Array | None = None, W_L: Array | None = None) -> Array:
    """The gate B (n_pad, d_k) of the final edited layer (slot m-1): ``editor.gate`` followed by
    ``editor.project_gate`` (``W_L``: that layer's kernel (d_k, d) before the batch; needed by editors
    that project, e.g. SPHERE), or the key-only ablation ``K_Lᵀ (K_L K_Lᵀ + λI)⁻¹`` (λ = the editor's
    ``l2``).  Raises ``NotGatedError`` for an editor whose update is not Δ = R·B(K)."""
    if mcfg.gate == "keyonly":
        if not hasattr(editor, "l2"):
            raise ValueError(f"metake.gate=keyonly needs an editor with an l2 ridge; {editor.name!r} has none")
        return mm(K_L.T, keyonly_gate(K_L, editor.l2))
    slot = stats.Cp.shape[0] - 1
    B = editor.gate(K_L, slot, stats, K_bare)
    if W_L is None:
        if type(editor).project_gate is not Editor.project_gate:
            raise ValueError(f"frozen_gate: editor {editor.name!r} projects its increment; pass the kernel W_L")
        return B
    return editor.project_gate(B, W_L, slot)


def lookahead_increment(ctx: LookaheadContext, Z: Array, valid: Array) -> Array:
    """Virtual look-ahead Δ_L(Z)ᵀ = ((Z − H_L) B)ᵀ, (d_k, d) kernel layout (eq. 8)."""
    return ((Z - ctx.H_L) * valid @ ctx.B).T


def prepare_lookahead(
    cfg: ModelConfig, params: Any, batch: EditBatch, layers: tuple[int, ...], stats: LayerStats,
    editor: Editor, mcfg: MetaKEConfig, look_batch: EditBatch | LookRows | None = None,
) -> LookaheadContext:
    """Gate and keys from the full ``batch``; cached hidden states for the rows that score the
    virtual model (``look_batch``: an ``EditBatch`` or grouped ``LookRows``; default the full batch)."""
    L = layers[-1]
    lr = as_look_rows(batch if look_batch is None else look_batch)
    K, H, Kb = editor_keys(cfg, params, batch, layers, editor)
    h_in = tuple(_look_lower(cfg, params, g, L) for g in lr.groups)
    logp = tuple(jax.nn.log_softmax(_look_upper(cfg, params, g, h, L)[1], axis=-1) for g, h in zip(lr.groups, h_in))
    B = frozen_gate(K[-1], stats, editor, mcfg, None if Kb is None else Kb[-1], w_out(params, (L,))[0])
    return LookaheadContext(B=B.astype(H.dtype), H_L=H, h_in=h_in, logp_init=logp)


def anchor_scale(Z0: Array, H_L: Array, valid: Array, mcfg: MetaKEConfig) -> Array:
    """Per-request unit ``s_i`` (n_pad,) of the anchor and of the outer step: ‖z⁰_i − h_L,i‖²
    (``anchor="relative"``; floored at a tiny positive value) or 1 (``"absolute"``).  Padding: 1."""
    if mcfg.anchor == "absolute":
        return jnp.ones_like(valid)
    s = jnp.sum(jnp.square(Z0 - H_L), axis=0)
    tiny = jnp.finfo(s.dtype).tiny ** 0.5
    return jnp.where(valid > 0, jnp.maximum(s, tiny), 1.0)


def anchor_term(Z: Array, Z0: Array, scale: Array) -> Array:
    """Per-request anchor ‖z_i − z⁰_i‖² / s_i (n_pad,) — docs/FORMULAS.md §6."""
    return jnp.sum(jnp.square(Z - Z0), axis=0) / scale


def virtual_losses(
    cfg: ModelConfig, params: Any, batch: EditBatch | LookRows, L: int, ctx: LookaheadContext, Z: Array,
    mcfg: MetaKEConfig,
) -> tuple[Array, Array]:
    """Per-request (ℓ_edit, ℓ_loc) (n_pad,) on the virtual model W_L + Δ_L(Z) (``batch``: the look rows,
    as given to ``prepare_lookahead``): NLL of the new target averaged over the scored rewriting rows,
    KL(P_cur ‖ P_init) on the KL row (docs/FORMULAS.md §3, §6)."""
    lr = as_look_rows(batch)
    inc = lookahead_increment(ctx, Z, lr.valid)
    request_delta = None
    if mcfg.feedback != "gated":
        inc = jax.lax.stop_gradient(inc)
    if mcfg.feedback == "ungated":
        request_delta = (Z - jax.lax.stop_gradient(Z)).T  # (n_pad, d)
    per = lr.nll_avg.shape[1] // lr.valid.shape[0]
    row_nll, kl_rows, start = [], [], 0
    for g, h_in, lp0 in zip(lr.groups, ctx.h_in, ctx.logp_init):
        if request_delta is not None and isinstance(g, PackedRows):
            raise ValueError("feedback='ungated' adds a per-row delta: it needs group_look_rows, not packed rows")
        size = g.tokens.shape[0]
        delta_rows = None if request_delta is None else request_delta[lr.rows[start:start + size] // per]
        start += size
        logits_t, logits_k = _look_upper(cfg, params, g, h_in, L, delta_rows=delta_rows,
                                         w_out=WDeltas((L,), inc[None]))
        a, b = row_terms(logits_t, logits_k, g, lp0)
        row_nll.append(a)
        kl_rows.append(b)
    return lr.nll_avg @ jnp.concatenate(row_nll), lr.kl_sel @ jnp.concatenate(kl_rows)


def meta_loss(
    cfg: ModelConfig, params: Any, batch: EditBatch, L: int, ctx: LookaheadContext, Z: Array,
    Z0: Array, mcfg: MetaKEConfig, scale: Array | None = None,
) -> tuple[Array, Array]:
    """ℓ_meta summed over real requests, and the per-request values (n_pad,) (eq. 7).

    ``scale``: the anchor unit s_i (``anchor_scale``); default computed from ``Z0`` and ``ctx.H_L``.
    """
    if scale is None:
        scale = anchor_scale(Z0, ctx.H_L, batch.valid, mcfg)
    edit, loc = virtual_losses(cfg, params, batch, L, ctx, Z, mcfg)
    per = (mcfg.edit_weight * edit + mcfg.loc_weight * loc
           + mcfg.anchor_weight * anchor_term(Z, Z0, scale))
    return jnp.sum(per * batch.valid), per


class RefineResult(NamedTuple):
    Z: Array  # (d, n_pad) refined targets Z^(T)
    losses: Array  # (T + 1, n_pad) per-request ℓ_meta along the refinement (first: at Z⁰, last: at Z^(T))
    step_sizes: Array  # (T, n_pad) accepted η_i per outer step (0: the request did not move)
    trials: Array  # (T,) loss-and-gradient evaluations per outer step (1 = first trial accepted)
    move: Array  # (n_pad,) ‖z_i^(T) − z⁰_i‖ / ‖r⁰_i‖ (relative move; 0 for padding)


def outer_steps(loss_and_grad, Z0: Array, scale: Array, valid: Array, mcfg: MetaKEConfig):
    """T outer steps ``z_i ← z_i − τ_i η s_i g_i`` with Armijo backtracking, one ``lax.scan``.

    ``loss_and_grad(Z) -> (per-request ℓ (n_pad,), ∇_Z Σ_i valid_i ℓ_i (d, n_pad))``.
    Returns (Z^(T), ℓ along the path (T+1, n_pad), accepted η τ_i (T, n_pad), evaluations per step (T,)).

    ``line_search``:
    * ``"batch"`` (default): one factor τ for the batch, halved until Σ_i ℓ_i falls by at least
      ``c τ η Σ_i s_i ‖g_i‖²`` — the batch's ℓ_meta never rises.  Requests are coupled through Δ_L
      (each request's virtual model carries every request's edit), so a step along ∇ Σ_i ℓ_i can raise
      one request's ℓ_i to first order however small it is; this mode allows that and says how often
      it happened (``RefineResult.losses``).
    * ``"request"``: a step τ_i per request, halved for the requests whose ℓ_i did not fall by
      ``c τ_i η s_i ‖g_i‖²`` at the joint trial point (if a request already at τ_i = 0 got worse,
      everybody halves) — every request's ℓ_i never rises, at the price of stalling when the coupling
      raises a converged request's ℓ_i (measured on SmolLM2: bench/RESULTS.md).
    * ``"none"``: plain steps (the literal reading).
    τ below ``2^-max_halvings`` becomes 0; if the budget of rounds is spent while the condition
    fails, nobody moves in that step.  A step whose first trial is accepted costs one evaluation.
    """
    eta0 = mcfg.lr
    tau_min = 0.5 ** mcfg.max_halvings
    max_rounds = (mcfg.max_halvings + 1) * (2 if mcfg.line_search == "request" else 1)
    per_request = mcfg.line_search == "request"

    def trial(Z, tau, g):
        return Z - (eta0 * tau * scale)[None, :] * g

    def step(carry, _):
        Z, per, g = carry
        gsq = jnp.sum(jnp.square(g), axis=0) * scale * valid  # s_i ‖g_i‖²
        tau = valid.astype(per.dtype)
        Zt = trial(Z, tau, g)
        pn, gn = loss_and_grad(Zt)
        if mcfg.line_search == "none":
            return (Zt, pn, gn), (pn, eta0 * tau, jnp.asarray(1))

        def failing(tau, pn):
            if per_request:  # a request at τ_i = 0 fails if the others' moves raised its ℓ_i
                return (valid > 0) & (pn > per - ARMIJO_C * eta0 * tau * gsq)
            drop = jnp.sum((per - pn) * valid)
            return jnp.broadcast_to(drop < ARMIJO_C * eta0 * jnp.sum(tau * gsq), per.shape) & (valid > 0)

        def cond(s):
            tau, pn, gn, r = s
            return jnp.any(failing(tau, pn)) & (r < max_rounds)

        def body(s):
            tau, pn, gn, r = s
            bad = failing(tau, pn)
            stuck = jnp.any(bad & (tau == 0))  # only the others can help it: everybody halves
            tau = jnp.where(bad | stuck, tau * 0.5, tau)
            tau = jnp.where(tau < tau_min, 0.0, tau)
            pn, gn = loss_and_grad(trial(Z, tau, g))
            return tau, pn, gn, r + 1

        tau, pn, gn, rounds = jax.lax.while_loop(cond, body, (tau, pn, gn, jnp.asarray(0)))
        ok = ~jnp.any(failing(tau, pn))
        tau = jnp.where(ok, tau, 0.0)
        Zn = jnp.where(ok, trial(Z, tau, g), Z)
        pn = jnp.where(ok, pn, per)
        gn = jnp.where(ok, gn, g)
        return (Zn, pn, gn), (pn, eta0 * tau, rounds + 1)

    per0, g0 = loss_and_grad(Z0)
    (Z, _, _), (curve, etas, trials) = jax.lax.scan(step, (Z0, per0, g0), None, length=mcfg.steps)
    return Z, jnp.concatenate([per0[None], curve], axis=0), etas, trials


@partial(jax.jit, static_argnames=("cfg", "layers", "editor", "mcfg"))
def refine_targets(
    cfg: ModelConfig, params: Any, batch: EditBatch, Z0: Array, layers: tuple[int, ...],
    stats: LayerStats, editor: Editor, mcfg: MetaKEConfig, look_batch: EditBatch | LookRows | None = None,
) -> RefineResult:
    """T outer steps on ℓ_meta with the frozen gate (Algorithm 1, docs/FORMULAS.md §6), one jitted scan.

    Z0 (d_model, n_pad) are the Stage I targets; ``look_batch``: the rows scoring the virtual model
    (``select_rows`` of ``batch``, optionally grouped by ``group_look_rows``), default all.
    """
    chex.assert_shape(Z0, (cfg.d_model, batch.valid.shape[0]))
    L = layers[-1]
    lb = batch if look_batch is None else look_batch
    ctx = prepare_lookahead(cfg, params, batch, layers, stats, editor, mcfg, lb)
    scale = anchor_scale(Z0, ctx.H_L, batch.valid, mcfg)
    vg = jax.value_and_grad(lambda z: meta_loss(cfg, params, lb, L, ctx, z, Z0, mcfg, scale), has_aux=True)

    def loss_and_grad(Z):
        (_, per), g = vg(Z)
        return per, g * batch.valid

    Z, losses, etas, trials = outer_steps(loss_and_grad, Z0, scale, batch.valid, mcfg)
    r0 = jnp.sqrt(anchor_scale(Z0, ctx.H_L, batch.valid, dataclasses.replace(mcfg, anchor="relative")))
    move = jnp.linalg.norm(Z - Z0, axis=0) / r0 * batch.valid
    return RefineResult(Z=Z, losses=losses, step_sizes=etas, trials=trials, move=move)
