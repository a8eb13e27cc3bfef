"""Multi-layer downstream write and the sequential cache update (docs/FORMULAS.md §4, B.2).

``multilayer_write`` is a pure function of the targets ``Z``: a ``lax.scan`` over the edited
layers whose carry is the stack of fc_out increments.  At step t it reruns the forward pass with
the increments of layers l_1..l_{t-1} applied, reads the current keys K_{l_t} and H_L, spreads the
remaining residual ``R = (Z - H_L) / (m - t)`` (``Editor.residual_divisor``) and solves the editor's
closed form (``metake_jax.editors``).  Because it
is differentiable end to end, the exact hypergradient (§7) is ``jax.grad`` of a loss of its
output.
"""
from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from metake_jax.batch import EditBatch
from metake_jax.editors import Editor, LayerStats
from metake_jax.editors.linalg import SolveDiagnostics, check_solve
from metake_jax.errors import EditError
from metake_jax.keys import keys_and_hidden
from metake_jax.sharding import to_host
from models.config import ModelConfig
from models.interface import ffn_output, w_out, with_w_out

Array = jax.Array


def editor_keys(cfg: ModelConfig, params: Any, batch: EditBatch, layers: tuple[int, ...], editor: Editor,
                deltas: Array | None = None) -> tuple[Array, Array, Array | None]:
    """Keys as ``editor`` reads them: (K (m, d_k, n_pad), H_L (d, n_pad), K_bare (m, d_k, n_pad) or None).

    ``editor.key_average``: ``grouped`` (MEMIT's ½·bare + ½·templates) or ``uniform`` (ROME's mean over
    the rewriting rows); ``K_bare`` (the bare prompt's keys) only when ``editor.uses_bare_keys``.
    ``editor.targets == "attn_ffn"`` (PMET): H is layer L's FFN output at the bare prompt, (d, n_pad)."""
    weights = batch.nll_avg if editor.key_average == "uniform" else None
    if editor.targets == "attn_ffn":  # PMET: H is the FFN output M_L = fc_out(k*) at the bare prompt
        K, _, K_bare = keys_and_hidden(cfg, params, batch, layers, deltas, weights=weights, bare=True)
        M = ffn_output(cfg, params, layers[-1], K_bare[-1].T, None if deltas is None else deltas[-1])
        return K, M.T * batch.valid, (K_bare if editor.uses_bare_keys else None)
    if editor.uses_bare_keys:
        return keys_and_hidden(cfg, params, batch, layers, deltas, weights=weights, bare=True)
    K, H = keys_and_hidden(cfg, params, batch, layers, deltas, weights=weights)
    return K, H, None


class WriteAux(NamedTuple):
    residual_norm: Array  # (m, n_pad) ‖R_l‖ per request at each layer step
    key_norm: Array  # (m, n_pad)
    solve: SolveDiagnostics | None = None  # each field (m,): the solve of each layer step


def check_write(aux: WriteAux, layers: tuple[int, ...]) -> None:
    """Refuse a write whose solve is unreliable at any layer (``editors.linalg.check_solve``: relative
    residual and estimated forward error): raises ``IllConditionedError`` naming the layer."""
    if aux.solve is None:
        return
    d = SolveDiagnostics(*(to_host(x) for x in aux.solve))
    for j, layer in enumerate(layers):
        check_solve(SolveDiagnostics(d.rel_residual[j], d.cond_est[j], d.eps[j]), layer)


def multilayer_write(
    cfg: ModelConfig,
    params: Any,
    batch: EditBatch,
    Z: Array,
    layers: tuple[int, ...],
    stats: LayerStats,
    editor: Editor,
    *,
    stop_grad_layers: Array | None = None,
) -> tuple[Array, WriteAux]:
    """All fc_out increments (m, d_k, d) for targets Z (d, n_pad) — docs/FORMULAS.md §4 B.2.

    Step t: keys K_t and H_L on the model carrying the increments of slots < t, residual
    ``R = (Z − H_L) / editor.residual_divisor(m, t)``, ``editor.increment`` then ``editor.project``;
    after the scan ``editor.finalize``.
    ``stop_grad_layers`` (m,) of 0/1: where 1, the increment of that slot is computed from a
    stop-gradient copy of Z (used by the §7 diagnostics to isolate the final layer's path).
    """
    m = len(layers)
    chex.assert_shape(Z, (cfg.d_model, batch.valid.shape[0]))
    deltas0 = jnp.zeros((m, cfg.d_ff, cfg.d_model), Z.dtype)
    Zs = jax.lax.stop_gradient(Z)
    W = w_out(params, tuple(layers))

    def step(deltas, t):
        K_all, H, Kb_all = editor_keys(cfg, params, batch, layers, editor, deltas)
        K = K_all[t]
        Kb = None if Kb_all is None else Kb_all[t]
        Zt = Z if stop_grad_layers is None else jnp.where(stop_grad_layers[t] > 0, Zs, Z)
        R = (Zt - H) * batch.valid / editor.residual_divisor(m, t).astype(Z.dtype)
        inc, diag = editor.increment(K, R, t, stats, Kb)
        inc = editor.project(inc, W[t], t)
        deltas = jax.lax.dynamic_update_index_in_dim(deltas, inc.astype(Z.dtype), t, axis=0)
        return deltas, (jnp.linalg.norm(R, axis=0), jnp.linalg.norm(K, axis=0), diag)

    deltas, (rn, kn, diag) = jax.lax.scan(step, deltas0, jnp.arange(m))
    deltas = editor.finalize(deltas, W).astype(Z.dtype)
    return deltas, WriteAux(residual_norm=rn, key_norm=kn, solve=diag)


@partial(jax.jit, static_argnames=("cfg", "layers"))
def updated_key_cache(cfg: ModelConfig, params: Any, batch: EditBatch, layers: tuple[int, ...],
                      Cp: Array) -> tuple[Array, Array]:
    """``(C_p + Σ K Kᵀ, finite)``: the C_p update with this batch's keys on the edited model (§4).

    One program, so the batch's K Kᵀ (m, d_k, d_k) is never a buffer of its own beside the old and
    the new C_p (at GPT-J shape each is 6 GiB in float32); ``finite`` says whether the new C_p is
    finite (the caller keeps the old state when it is not).
    """
    chex.assert_rank(Cp, 3)
    K, _ = keys_and_hidden(cfg, params, batch, layers)
    new = Cp + jnp.einsum("mkn,mjn->mkj", K, K).astype(Cp.dtype)
    return new, jnp.isfinite(new).all()


def apply_deltas(params: Any, layers: tuple[int, ...], deltas: Array) -> Any:
    """New param tree with fc_out kernels of ``layers`` incremented — all or nothing.

    Raises EditError (naming the layer) if any increment or resulting weight is non-finite; the
    input tree is never modified.
    """
    finite = to_host(jnp.isfinite(deltas).all(axis=tuple(range(1, deltas.ndim))))  # (m,): no host copy of deltas
    for j, l in enumerate(layers):
        if not finite[j]:
            raise EditError(f"non-finite update for layer {l}: refusing to write the batch")
    out = with_w_out(params, tuple(layers), deltas, add=True)
    if not bool(jnp.isfinite(w_out(out, tuple(layers))).all()):
        raise EditError(f"edited weights of layers {layers} would be non-finite: batch not written")
    return out


# ============================================================================ association / realized γ (§5, §10)


def association_beta(K: Array, stats: LayerStats, editor: Editor, slot: int = -1) -> np.ndarray:
    """Association ``β_i`` of each request at edited-layer slot ``slot`` (docs/FORMULAS.md §5, §10).

    AlphaEdit: ``β_i = k_iᵀ P A⁻¹ k_i`` with ``A = C_p P + λ I`` (the slot's P, C_p, λ = ``l2``);
    MEMIT: ``β_i = k_iᵀ (λ_C C_0)⁻¹ k_i`` (plus C_p inside the inverse when ``use_cache``).
    Computed in float64 through ``editor.association`` (which gives ``α = β/(1+β)``) and inverted,
    ``β = α/(1−α)``; float64 keeps that inversion accurate.  Raises NotImplementedError for an editor
    without an association statistic.

    K: (d_key, n_req) keys at the slot's layer (columns = requests), before the write.
    Returns a float64 numpy array (n_req,), dimensionless.  Raises ValueError on shape mismatch
    (from the editors' checks).
    """
    with jax.enable_x64(True):
        Kd = jnp.asarray(K, jnp.float64)
        a = np.asarray(editor.association(Kd, slot, stats), np.float64)
    with np.errstate(divide="ignore"):
        return a / (1.0 - a)


@jax.jit
def realized_gamma(R_planned: Array, R_realized: Array, eps: float = 1e-8) -> Array:
    """``γ_i = ⟨r̂_i, r_i⟩ / (‖r_i‖² + ε)`` per request (docs/FORMULAS.md §5 C.6, §10).

    R_planned: (d_model, n_req) planned residuals ``r_i = z_i − h_L,i``;
    R_realized: (d_model, n_req) realized ``r̂_i = h_L,i^post − h_L,i``.  Returns (n_req,) float32.
    """
    num = jnp.sum(R_realized * R_planned, axis=0)
    return num / (jnp.sum(jnp.square(R_planned), axis=0) + eps)
