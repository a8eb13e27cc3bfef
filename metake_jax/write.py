"""Multi-layer downstream write and the sequential cache update (docs/FORMULAS.md §4, B.2).

``multilayer_write`` is a pure function of the targets ``Z``: a ``lax.scan`` over the edited
layers whose carry is the stack of fc_out increments.  At step t it reruns the forward pass with
the increments of layers l_1..l_{t-1} applied, reads the current keys K_{l_t} and H_L, spreads the
remaining residual ``R = (Z - H_L) / (m - t)`` and solves the editor's closed form.  Because it
is differentiable end to end, the exact hypergradient (§7) is ``jax.grad`` of a loss of its
output.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from metake_jax import editors
from metake_jax.batch import EditBatch
from metake_jax.errors import EditError
from metake_jax.keys import keys_and_hidden
from models.config import ModelConfig
from models.interface import w_out, with_w_out

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class EditorConfig:
    """Downstream editor (docs/FORMULAS.md §R6): ``alphaedit`` (P, C_p, L2) or ``memit`` (λ C0)."""

    method: str = "alphaedit"
    l2: float = 10.0  # AlphaEdit λ (L2)
    mom2_update_weight: float = 15000.0  # MEMIT λ_C
    memit_use_cache: bool = False  # MEMIT_seq: add C_p to the system matrix
    solve_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.method not in ("alphaedit", "memit"):
            raise ValueError(f"unknown downstream editor {self.method!r} (alphaedit | memit)")


class LayerStats(NamedTuple):
    """Per-edited-layer matrices, stacked on a leading axis of size m (d_k × d_k each).

    P:  null-space projectors (AlphaEdit), fixed from the unedited model.
    C0: normalized second moments E[k kᵀ] (MEMIT).
    Cp: Σ K Kᵀ of previously written batches (sequential editing).
    """

    P: Array | None
    C0: Array | None
    Cp: Array


def gate(K: Array, t: Array | int, stats: LayerStats, ecfg: EditorConfig) -> Array:
    """The d_k × d_k gate G of layer slot t: Δᵀ = G K Rᵀ (docs/FORMULAS.md §4, §6)."""
    Cp = stats.Cp[t]
    dt = jnp.dtype(ecfg.solve_dtype)
    if ecfg.method == "alphaedit":
        return editors.alphaedit_gate(K, stats.P[t], Cp, ecfg.l2, solve_dtype=dt)
    return editors.memit_gate(K, stats.C0[t], ecfg.mom2_update_weight,
                              Cp if ecfg.memit_use_cache else None, solve_dtype=dt)


def layer_increment(K: Array, R: Array, t: Array | int, stats: LayerStats,
                    ecfg: EditorConfig) -> tuple[Array, editors.SolveDiagnostics]:
    """Kernel increment (d_k, d) of slot t from keys K (d_k, n) and residual R (d, n), with the
    diagnostics of its solve (``editors.check_solve`` turns bad ones into an error)."""
    dt = jnp.dtype(ecfg.solve_dtype)
    if ecfg.method == "alphaedit":
        return editors.alphaedit_increment(K, R, stats.P[t], stats.Cp[t], ecfg.l2, solve_dtype=dt,
                                           return_diagnostics=True)
    Cp = stats.Cp[t] if ecfg.memit_use_cache else None
    return editors.memit_increment(K, R, stats.C0[t], ecfg.mom2_update_weight, Cp=Cp, solve_dtype=dt,
                                   return_diagnostics=True)


class WriteAux(NamedTuple):
    residual_norm: Array  # (m, n_pad) ‖R_l‖ per request at each layer step
    key_norm: Array  # (m, n_pad)
    solve: editors.SolveDiagnostics | None = None  # each field (m,): the solve of each layer step


def check_write(aux: WriteAux, layers: tuple[int, ...]) -> None:
    """Refuse a write whose solve is unreliable at any layer (``editors.check_solve``: relative
    residual and estimated forward error): raises ``IllConditionedError`` naming the layer."""
    if aux.solve is None:
        return
    d = editors.SolveDiagnostics(*(np.asarray(x) for x in aux.solve))
    for j, layer in enumerate(layers):
        editors.check_solve(editors.SolveDiagnostics(d.rel_residual[j], d.cond_est[j], d.eps[j]), layer)


def multilayer_write(
    cfg: ModelConfig,
    params: Any,
    batch: EditBatch,
    Z: Array,
    layers: tuple[int, ...],
    stats: LayerStats,
    ecfg: EditorConfig,
    *,
    stop_grad_layers: Array | None = None,
) -> tuple[Array, WriteAux]:
    """All fc_out increments (m, d_k, d) for targets Z (d, n_pad) — docs/FORMULAS.md §4 B.2.

    ``stop_grad_layers`` (m,) of 0/1: where 1, the increment of that slot is computed from a
    stop-gradient copy of Z (used by the §7 diagnostics to isolate the final layer's path).
    """
    m = len(layers)
    chex.assert_shape(Z, (cfg.d_model, batch.valid.shape[0]))
    deltas0 = jnp.zeros((m, cfg.d_ff, cfg.d_model), Z.dtype)
    Zs = jax.lax.stop_gradient(Z)

    def step(deltas, t):
        K_all, H = keys_and_hidden(cfg, params, batch, layers, deltas)
        K = K_all[t]
        Zt = Z if stop_grad_layers is None else jnp.where(stop_grad_layers[t] > 0, Zs, Z)
        R = (Zt - H) * batch.valid / (m - t).astype(Z.dtype)
        inc, diag = layer_increment(K, R, t, stats, ecfg)
        deltas = jax.lax.dynamic_update_index_in_dim(deltas, inc.astype(Z.dtype), t, axis=0)
        return deltas, (jnp.linalg.norm(R, axis=0), jnp.linalg.norm(K, axis=0), diag)

    deltas, (rn, kn, diag) = jax.lax.scan(step, deltas0, jnp.arange(m))
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
    d = np.asarray(deltas)
    for j, l in enumerate(layers):
        if not np.isfinite(d[j]).all():
            raise EditError(f"non-finite update for layer {l}: refusing to write the batch")
    out = with_w_out(params, tuple(layers), d, add=True)
    if not bool(jnp.isfinite(w_out(out, tuple(layers))).all()):
        raise EditError(f"edited weights of layers {layers} would be non-finite: batch not written")
    return out
