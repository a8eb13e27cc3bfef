"""Keys K_l of all edited layers and the block-L output H_L in one pass (docs/FORMULAS.md §2, §4).

Pure and jittable; ``layers`` is static.  Keys are read at each row's subject-last token and
averaged over context templates with ``batch.key_avg`` (½·"{}" + ½·mean of the sampled
templates); ``H_L`` is the block-``L`` output at the subject's last token of the bare prompt.
Padded requests get zero key and hidden columns.
"""
from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp

from metake_jax.batch import EditBatch
from models.config import ModelConfig
from models.interface import WDeltas, forward
from models.layers import f32

Array = jax.Array


def keys_and_hidden(
    cfg: ModelConfig,
    params: Any,
    batch: EditBatch,
    layers: tuple[int, ...],
    deltas: Array | None = None,
    *,
    weights: Array | None = None,
    bare: bool = False,
) -> tuple[Array, ...]:
    """Returns (K: (m, d_k, n_pad) template-averaged keys, H_L: (d, n_pad)), and with ``bare=True`` also
    K_bare (m, d_k, n_pad): the keys of the bare prompt alone (ROME's k*).

    ``deltas`` (m, d_k, d): current fc_out increments of ``layers`` (multi-layer write, §4 B.2).
    ``weights`` (n_pad, R): the key averaging over each request's rows (default ``batch.key_avg``,
    MEMIT's grouped ½/½; ROME uses the uniform ``batch.nll_avg``).
    """
    L = layers[-1]
    w = WDeltas(layers, deltas) if deltas is not None else None
    out = forward(
        cfg, params, batch.tokens, batch.mask, w_out_deltas=w, taps=layers,
        tap_positions=batch.lookup[:, None], stop_layer=L + 1,
    )
    rows_k = f32(out.keys[:, :, 0, :])  # (m, R, d_k)
    avg = batch.key_avg if weights is None else weights
    K = jnp.einsum("nr,mrk->mkn", avg, rows_k) * batch.valid
    H = f32(out.hidden[-1, :, 0, :])[batch.bare_row].T * batch.valid  # (d, n_pad)
    chex.assert_shape(K, (len(layers), cfg.d_ff, batch.valid.shape[0]))
    if not bare:
        return K, H
    K_bare = jnp.transpose(rows_k[:, batch.bare_row, :], (0, 2, 1)) * batch.valid
    return K, H, K_bare
