"""Exact multi-layer hypergradient and the proxy-fidelity diagnostics (docs/FORMULAS.md §7).

``F(Z) = ℓ_meta(W + Δ*(Z))`` where ``Δ*(Z)`` is the whole multi-layer write of §4
(``write.multilayer_write``: a ``lax.scan`` over the edited layers whose carry is the stack of
increments, each step recomputing keys and H_L under the current weights).  ``jax.grad`` of F
differentiates through every forward pass and every solve.

Diagnostics per request (C.5): cos(g_proxy, g_exact), cos(g_final, g_exact), cos(g_proxy, g_final);
one-step relative reduction of F (basis points) for g ∈ {exact, proxy, key-only, none}, at the same η
(the refinement's step ``Z − η s_i g``) and at equal step length (every direction normalised to the
proxy step's length); leakage ratio ρ and proxy gap ε.  The anchor is MetaKE's (relative or
absolute, ``metake.anchor_term``).
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from metake_jax.batch import EditBatch
from metake_jax.keys import keys_and_hidden
from metake_jax.metake import MetaKEConfig, anchor_scale, anchor_term, meta_loss, prepare_lookahead, virtual_losses
from metake_jax.targets import edit_and_loc_losses, gather_positions, lower_hidden
from metake_jax.editors import Editor, LayerStats
from metake_jax.write import multilayer_write
from models.config import ModelConfig
from models.interface import WDeltas, forward, head

Array = jax.Array


class ExactContext(NamedTuple):
    h_in: Array  # (R, T, d) hidden states entering the first edited layer
    logp_init: Array  # (R, V)
    H_L: Array  # (d, n_pad) unedited block-L output at the subject's last token (for the anchor unit)


def prepare_exact(cfg: ModelConfig, params: Any, batch: EditBatch, layers: tuple[int, ...]) -> ExactContext:
    h_in = lower_hidden(cfg, params, batch, layers[0])
    lp = _post_edit_logits(cfg, params, batch, layers, h_in, None)[1]
    _, H = keys_and_hidden(cfg, params, batch, layers)
    return ExactContext(h_in=h_in, logp_init=jax.nn.log_softmax(lp, axis=-1), H_L=H)


def _post_edit_logits(cfg, params, batch, layers, h_in, deltas):
    w = WDeltas(layers, deltas) if deltas is not None else None
    out = forward(cfg, params, None, batch.mask, h_start=h_in, start_layer=layers[0],
                  w_out_deltas=w, stop_layer=cfg.n_layers)
    h = out.last_hidden
    return (head(cfg, params, gather_positions(h, batch.tgt_pos)),
            head(cfg, params, gather_positions(h, batch.lookup[:, None]))[:, 0])


def exact_task_losses(
    cfg: ModelConfig, params: Any, batch: EditBatch, layers: tuple[int, ...], stats: LayerStats,
    editor: Editor, ectx: ExactContext, Z: Array, stop_grad_layers: Array | None = None,
    mcfg: MetaKEConfig = MetaKEConfig(),
) -> Array:
    """Per-request task loss edit_w·ℓ_edit + loc_w·ℓ_loc after the full multi-layer write of Z."""
    deltas, _ = multilayer_write(cfg, params, batch, Z, layers, stats, editor,
                                 stop_grad_layers=stop_grad_layers)
    logits_t, logits_k = _post_edit_logits(cfg, params, batch, layers, ectx.h_in, deltas)
    edit, loc = edit_and_loc_losses(logits_t, logits_k, batch, ectx.logp_init)
    return mcfg.edit_weight * edit + mcfg.loc_weight * loc


def exact_F(cfg, params, batch, layers, stats, editor, ectx, Z, Z0, mcfg=MetaKEConfig()) -> Array:
    """Per-request F(Z) (task loss after the full write + a · anchor, docs/FORMULAS.md §6–§7)."""
    task = exact_task_losses(cfg, params, batch, layers, stats, editor, ectx, Z, mcfg=mcfg)
    scale = anchor_scale(Z0, ectx.H_L, batch.valid, mcfg)
    return task + mcfg.anchor_weight * anchor_term(Z, Z0, scale)


@partial(jax.jit, static_argnames=("cfg", "layers", "editor", "mcfg"))
def exact_hypergradient(cfg, params, batch, Z, Z0, layers, stats, editor, mcfg=MetaKEConfig()) -> Array:
    """∇_Z Σ_i F_i(Z) through the whole multi-layer procedure (d, n_pad)."""
    ectx = prepare_exact(cfg, params, batch, layers)
    f = lambda z: jnp.sum(exact_F(cfg, params, batch, layers, stats, editor, ectx, z, Z0, mcfg) * batch.valid)  # noqa: E731
    return jax.grad(f)(Z)


@partial(jax.jit, static_argnames=("cfg", "layers", "editor", "mcfg"))
def proxy_hypergradient(cfg, params, batch, Z, Z0, layers, stats, editor, mcfg=MetaKEConfig()) -> Array:
    """∇_Z ℓ_meta on the virtual single-layer model with the frozen gate (Structural Gradient Proxy)."""
    ctx = prepare_lookahead(cfg, params, batch, layers, stats, editor, mcfg)
    f = lambda z: meta_loss(cfg, params, batch, layers[-1], ctx, z, Z0, mcfg)[0]  # noqa: E731
    return jax.grad(f)(Z)


class Diagnostics(NamedTuple):
    cos: Array  # (n_pad,) cos(g_proxy, g_exact) per request (full ℓ_meta gradients)
    cos_final_exact: Array  # (n_pad,) cos(g_final, g_exact): what the earlier layers' paths change
    cos_proxy_final: Array  # (n_pad,) cos(g_proxy, g_final): the final layer's linearisation point
    reduction_bp: Array  # (4, n_pad) one-step relative reduction of F_i at the same η: exact, proxy, keyonly, none
    reduction_eq_bp: Array  # (4, n_pad) the same at equal step length (each = the proxy step's length)
    leakage: Array  # (n_pad,) ρ = ‖g_nonfinal‖ / ‖g_final‖
    proxy_gap: Array  # (n_pad,) ε = ‖g_final − g_proxy,med‖ / ‖g_proxy,med‖
    F0: Array  # (n_pad,) F_i at Z
    g_exact: Array
    g_proxy: Array


GRADIENTS = ("exact", "proxy", "keyonly", "none")


_STATIC = ("cfg", "layers", "editor", "mcfg")


@partial(jax.jit, static_argnames=_STATIC)
def _exact_task_grad(cfg, params, batch, Z, layers, stats, editor, mcfg, sg):
    """∇_Z of the summed task loss after the full write; ``sg`` (m,) stops chosen layers' paths."""
    ectx = prepare_exact(cfg, params, batch, layers)
    f = lambda z: jnp.sum(exact_task_losses(cfg, params, batch, layers, stats, editor, ectx, z, sg, mcfg)  # noqa: E731
                          * batch.valid)
    return jax.grad(f)(Z)


@partial(jax.jit, static_argnames=_STATIC)
def _proxy_task_grad(cfg, params, batch, Z, layers, stats, editor, mcfg):
    """∇_Z of the summed task loss on the virtual model (downstream-mediated proxy, anchor excluded)."""
    ctx = prepare_lookahead(cfg, params, batch, layers, stats, editor, mcfg)

    def f(z):
        e, l = virtual_losses(cfg, params, batch, layers[-1], ctx, z, mcfg)
        return jnp.sum((mcfg.edit_weight * e + mcfg.loc_weight * l) * batch.valid)

    return jax.grad(f)(Z)


@partial(jax.jit, static_argnames=_STATIC)
def _F_per(cfg, params, batch, Z, Z0, layers, stats, editor, mcfg):
    ectx = prepare_exact(cfg, params, batch, layers)
    return exact_F(cfg, params, batch, layers, stats, editor, ectx, Z, Z0, mcfg)


@partial(jax.jit, static_argnames=("cfg", "layers", "mcfg"))
def _anchor_unit(cfg, params, batch, Z0, layers, mcfg):
    """The anchor unit s_i (n_pad,) on the unedited model (``metake.anchor_scale``)."""
    _, H = keys_and_hidden(cfg, params, batch, layers)
    return anchor_scale(Z0, H, batch.valid, mcfg)


def _cos(a: Array, b: Array) -> Array:
    """Per-column cosine (n_pad,) of two (d, n_pad) arrays (0 where either column is 0)."""
    nrm = jnp.linalg.norm(a, axis=0) * jnp.linalg.norm(b, axis=0)
    return jnp.sum(a * b, axis=0) / jnp.maximum(nrm, 1e-30)


def diagnostics(
    cfg: ModelConfig, params: Any, batch: EditBatch, Z: Array, Z0: Array, layers: tuple[int, ...],
    stats: LayerStats, editor: Editor, mcfg: MetaKEConfig, eta: float,
) -> Diagnostics:
    """All §7 diagnostics at Z (usually the Stage I output, with Z0 = Z); shapes as ``Diagnostics``.

    The step of a direction g at "the same η" is the refinement's ``z_i − η s_i g_i`` (s_i the anchor
    unit, ``metake.anchor_scale``); at "equal step length" every direction is normalised per request
    to the proxy step's length η s_i ‖g_proxy,i‖.  ``g_final`` is the exact task gradient with the
    non-final layers' dependence on Z stopped, plus the anchor gradient.  Each gradient / evaluation
    is its own jitted computation so that peak memory is that of one backward pass through the
    multi-layer write, not of all of them at once.
    """
    m = len(layers)
    valid = batch.valid
    scale = _anchor_unit(cfg, params, batch, Z0, layers, mcfg)
    g_anchor = 2.0 * mcfg.anchor_weight * (Z - Z0) / scale * valid
    g_task = _exact_task_grad(cfg, params, batch, Z, layers, stats, editor, mcfg, jnp.zeros((m,)))
    sg = jnp.concatenate([jnp.ones((m - 1,)), jnp.zeros((1,))])
    g_final_task = _exact_task_grad(cfg, params, batch, Z, layers, stats, editor, mcfg, sg)
    g_exact = g_task + g_anchor
    g_final = g_final_task + g_anchor
    g_nonfinal = g_task - g_final_task
    g_proxy_med = _proxy_task_grad(cfg, params, batch, Z, layers, stats, editor, mcfg)
    g_proxy = g_proxy_med + g_anchor
    key_cfg = dataclasses.replace(mcfg, gate="keyonly")
    g_key = _proxy_task_grad(cfg, params, batch, Z, layers, stats, editor, key_cfg) + g_anchor

    nrm = lambda x: jnp.linalg.norm(x, axis=0)  # noqa: E731
    F0 = _F_per(cfg, params, batch, Z, Z0, layers, stats, editor, mcfg)
    length = eta * scale * nrm(g_proxy)  # (n_pad,) the proxy step's length

    def reduction(step: Array) -> Array:
        F1 = _F_per(cfg, params, batch, Z - step * valid, Z0, layers, stats, editor, mcfg)
        return (F0 - F1) / jnp.maximum(jnp.abs(F0), 1e-30) * 1e4

    red, red_eq = [], []
    for g in (g_exact, g_proxy, g_key, jnp.zeros_like(Z)):
        red.append(reduction(eta * scale * g))
        red_eq.append(reduction(length * g / jnp.maximum(nrm(g), 1e-30)))
    return Diagnostics(
        cos=_cos(g_proxy, g_exact), cos_final_exact=_cos(g_final, g_exact), cos_proxy_final=_cos(g_proxy, g_final),
        reduction_bp=jnp.stack(red), reduction_eq_bp=jnp.stack(red_eq),
        leakage=nrm(g_nonfinal) / jnp.maximum(nrm(g_final_task), 1e-30),
        proxy_gap=nrm(g_final_task - g_proxy_med) / jnp.maximum(nrm(g_proxy_med), 1e-30), F0=F0,
        g_exact=g_exact, g_proxy=g_proxy,
    )
