"""Exact multi-layer hypergradient and the proxy-fidelity diagnostics (METHOD.md §7).

``F(Z) = ℓ_meta(W + Δ*(Z))`` where ``Δ*(Z)`` is the whole multi-layer write of §4
(``write.multilayer_write``: a ``lax.scan`` over the edited layers whose carry is the stack of
increments, each step recomputing keys and H_L under the current weights).  ``jax.grad`` of F
differentiates through every forward pass and every solve.

Diagnostics per request (C.5): cos(g_proxy, g_exact); one-step relative reduction of F (basis
points) for Z − η g with g ∈ {exact, proxy, key-only, none}; leakage ratio ρ and proxy gap ε.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from metake_jax.batch import EditBatch
from metake_jax.metake import MetaKEConfig, meta_loss, prepare_lookahead, virtual_losses
from metake_jax.targets import edit_and_loc_losses, gather_positions, lower_hidden
from metake_jax.write import EditorConfig, LayerStats, multilayer_write
from models.config import ModelConfig
from models.interface import WDeltas, forward, head

Array = jax.Array


class ExactContext(NamedTuple):
    h_in: Array  # (R, T, d) hidden states entering the first edited layer
    logp_init: Array  # (R, V)


def prepare_exact(cfg: ModelConfig, params: Any, batch: EditBatch, layers: tuple[int, ...]) -> ExactContext:
    h_in = lower_hidden(cfg, params, batch, layers[0])
    lp = _post_edit_logits(cfg, params, batch, layers, h_in, None)[1]
    return ExactContext(h_in=h_in, logp_init=jax.nn.log_softmax(lp, axis=-1))


def _post_edit_logits(cfg, params, batch, layers, h_in, deltas):
    w = WDeltas(layers, deltas) if deltas is not None else None
    out = forward(cfg, params, None, batch.mask, h_start=h_in, start_layer=layers[0],
                  w_out_deltas=w, stop_layer=cfg.n_layers)
    h = out.last_hidden
    return (head(cfg, params, gather_positions(h, batch.tgt_pos)),
            head(cfg, params, gather_positions(h, batch.lookup[:, None]))[:, 0])


def exact_task_losses(
    cfg: ModelConfig, params: Any, batch: EditBatch, layers: tuple[int, ...], stats: LayerStats,
    ecfg: EditorConfig, ectx: ExactContext, Z: Array, stop_grad_layers: Array | None = None,
    mcfg: MetaKEConfig = MetaKEConfig(),
) -> Array:
    """Per-request task loss edit_w·ℓ_edit + loc_w·ℓ_loc after the full multi-layer write of Z."""
    deltas, _ = multilayer_write(cfg, params, batch, Z, layers, stats, ecfg,
                                 stop_grad_layers=stop_grad_layers)
    logits_t, logits_k = _post_edit_logits(cfg, params, batch, layers, ectx.h_in, deltas)
    edit, loc = edit_and_loc_losses(logits_t, logits_k, batch, ectx.logp_init)
    return mcfg.edit_weight * edit + mcfg.loc_weight * loc


def exact_F(cfg, params, batch, layers, stats, ecfg, ectx, Z, Z0, mcfg=MetaKEConfig()) -> Array:
    """Per-request F(Z) (task loss after the full write + anchor ‖z_i − z_i⁽⁰⁾‖²)."""
    task = exact_task_losses(cfg, params, batch, layers, stats, ecfg, ectx, Z, mcfg=mcfg)
    return task + mcfg.anchor_weight * jnp.sum(jnp.square(Z - Z0), axis=0)


@partial(jax.jit, static_argnames=("cfg", "layers", "ecfg", "mcfg"))
def exact_hypergradient(cfg, params, batch, Z, Z0, layers, stats, ecfg, mcfg=MetaKEConfig()) -> Array:
    """∇_Z Σ_i F_i(Z) through the whole multi-layer procedure (d, n_pad)."""
    ectx = prepare_exact(cfg, params, batch, layers)
    f = lambda z: jnp.sum(exact_F(cfg, params, batch, layers, stats, ecfg, ectx, z, Z0, mcfg) * batch.valid)  # noqa: E731
    return jax.grad(f)(Z)


@partial(jax.jit, static_argnames=("cfg", "layers", "ecfg", "mcfg"))
def proxy_hypergradient(cfg, params, batch, Z, Z0, layers, stats, ecfg, mcfg=MetaKEConfig()) -> Array:
    """∇_Z ℓ_meta on the virtual single-layer model with the frozen gate (Structural Gradient Proxy)."""
    ctx = prepare_lookahead(cfg, params, batch, layers, stats, ecfg, mcfg)
    f = lambda z: meta_loss(cfg, params, batch, layers[-1], ctx, z, Z0, mcfg)[0]  # noqa: E731
    return jax.grad(f)(Z)


class Diagnostics(NamedTuple):
    cos: Array  # (n_pad,) cos(g_proxy, g_exact) per request (full ℓ_meta gradients)
    reduction_bp: Array  # (4, n_pad) one-step relative reduction of F_i: exact, proxy, keyonly, none
    leakage: Array  # (n_pad,) ρ = ‖g_nonfinal‖ / ‖g_final‖
    proxy_gap: Array  # (n_pad,) ε = ‖g_final − g_proxy,med‖ / ‖g_proxy,med‖
    F0: Array  # (n_pad,) F_i at Z
    g_exact: Array
    g_proxy: Array


GRADIENTS = ("exact", "proxy", "keyonly", "none")


_STATIC = ("cfg", "layers", "ecfg", "mcfg")


@partial(jax.jit, static_argnames=_STATIC)
def _exact_task_grad(cfg, params, batch, Z, layers, stats, ecfg, mcfg, sg):
    """∇_Z of the summed task loss after the full write; ``sg`` (m,) stops chosen layers' paths."""
    ectx = prepare_exact(cfg, params, batch, layers)
    f = lambda z: jnp.sum(exact_task_losses(cfg, params, batch, layers, stats, ecfg, ectx, z, sg, mcfg)  # noqa: E731
                          * batch.valid)
    return jax.grad(f)(Z)


@partial(jax.jit, static_argnames=_STATIC)
def _proxy_task_grad(cfg, params, batch, Z, layers, stats, ecfg, mcfg):
    """∇_Z of the summed task loss on the virtual model (downstream-mediated proxy, anchor excluded)."""
    ctx = prepare_lookahead(cfg, params, batch, layers, stats, ecfg, mcfg)

    def f(z):
        e, l = virtual_losses(cfg, params, batch, layers[-1], ctx, z, mcfg)
        return jnp.sum((mcfg.edit_weight * e + mcfg.loc_weight * l) * batch.valid)

    return jax.grad(f)(Z)


@partial(jax.jit, static_argnames=_STATIC)
def _F_per(cfg, params, batch, Z, Z0, layers, stats, ecfg, mcfg):
    ectx = prepare_exact(cfg, params, batch, layers)
    return exact_F(cfg, params, batch, layers, stats, ecfg, ectx, Z, Z0, mcfg)


def diagnostics(
    cfg: ModelConfig, params: Any, batch: EditBatch, Z: Array, Z0: Array, layers: tuple[int, ...],
    stats: LayerStats, ecfg: EditorConfig, mcfg: MetaKEConfig, eta: float,
) -> Diagnostics:
    """All §7 diagnostics at Z (usually the Stage I output, with Z0 = Z).

    Each gradient / evaluation is its own jitted computation so that peak memory is that of one
    backward pass through the multi-layer write, not of all of them at once.
    """
    m = len(layers)
    valid = batch.valid
    g_anchor = 2.0 * mcfg.anchor_weight * (Z - Z0) * valid
    g_task = _exact_task_grad(cfg, params, batch, Z, layers, stats, ecfg, mcfg, jnp.zeros((m,)))
    sg = jnp.concatenate([jnp.ones((m - 1,)), jnp.zeros((1,))])
    g_final = _exact_task_grad(cfg, params, batch, Z, layers, stats, ecfg, mcfg, sg)
    g_exact = g_task + g_anchor
    g_nonfinal = g_task - g_final
    g_proxy_med = _proxy_task_grad(cfg, params, batch, Z, layers, stats, ecfg, mcfg)
    g_proxy = g_proxy_med + g_anchor
    key_cfg = dataclasses.replace(mcfg, gate="keyonly")
    g_key = _proxy_task_grad(cfg, params, batch, Z, layers, stats, ecfg, key_cfg) + g_anchor

    nrm = lambda x: jnp.linalg.norm(x, axis=0)  # noqa: E731
    cos = jnp.sum(g_proxy * g_exact, 0) / jnp.maximum(nrm(g_proxy) * nrm(g_exact), 1e-30)
    F0 = _F_per(cfg, params, batch, Z, Z0, layers, stats, ecfg, mcfg)
    red = []
    for g in (g_exact, g_proxy, g_key, jnp.zeros_like(Z)):
        F1 = _F_per(cfg, params, batch, Z - eta * g * valid, Z0, layers, stats, ecfg, mcfg)
        red.append((F0 - F1) / jnp.maximum(jnp.abs(F0), 1e-30) * 1e4)
    return Diagnostics(
        cos=cos, reduction_bp=jnp.stack(red), leakage=nrm(g_nonfinal) / jnp.maximum(nrm(g_final), 1e-30),
        proxy_gap=nrm(g_final - g_proxy_med) / jnp.maximum(nrm(g_proxy_med), 1e-30), F0=F0,
        g_exact=g_exact, g_proxy=g_proxy,
    )
