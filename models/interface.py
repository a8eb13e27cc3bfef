"""The one model interface every piece of editing code uses (docs/FORMULAS.md §1).

All functions are pure and jit-friendly; ``cfg`` and every layer index / tuple of layers are
static.  The layer stack is run with ``jax.lax.scan`` over layer indices with dynamic indexing of
the stacked params, so compile time does not grow with depth and no layer weights are copied.

Hooks:
* ``w_out_deltas = WDeltas(layers, delta)``: add ``delta[j]`` (d_k, d) to the fc_out kernel of layer
  ``layers[j]`` (the edited weight, Flax (in, out) layout) without copying the param tree.
* ``add_at = AddAt(layer, positions, delta)``: add ``delta[b]`` (d,) to block ``layer``'s output at
  token ``positions[b]`` of example b (Stage I, docs/FORMULAS.md §3).
* ``taps`` (static tuple of layers) with ``tap_positions`` (B, P): return block outputs and keys
  of those layers gathered at those positions.
* ``block_parts_at`` / ``ffn_output``: a block's attention and FFN outputs, each shiftable (PMET's
  Stage I and its FFN-output residual, docs/FORMULAS.md §4 "PMET").
* ``start_layer`` / ``h_start``: begin from the hidden states entering ``start_layer`` (caching the
  layers below); ``stop_layer``: stop after block ``stop_layer - 1`` and return no logits.

Prefix reuse (Stage I, docs/FORMULAS.md §3): ``run_layers_kv`` runs blocks over whole rows once and
returns every block's attention keys/values; ``run_layers_after_prefix`` then runs the same blocks
over only a suffix of each row (from a per-row start on, at its absolute positions), attending to
the cached keys/values of the positions before it (a ``KVPrefix``).  Causal attention makes this
exact whenever the change being studied enters at or after the suffix start.
"""
from __future__ import annotations

import functools
import operator
from typing import Any, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
from flax import traverse_util

from models import layers as L
from models.config import ModelConfig
from models.families import block_options
from models.layers import Context, make_context

Array = jax.Array
Params = dict[str, Any]

__all__ = [
    "AddAt", "Context", "ForwardOut", "KVPrefix", "WDeltas", "block_at", "block_parts_at", "embed", "ffn_output",
    "forward", "gather_positions", "head", "layer_params", "make_context", "run_layers", "run_layers_after_prefix",
    "run_layers_kv", "suffix_positions", "w_out", "with_w_out", "W_OUT_PATH",
]


class WDeltas(NamedTuple):
    layers: tuple[int, ...]  # static
    delta: Array  # (m, d_k, d)


class AddAt(NamedTuple):
    layer: int  # static
    positions: Array  # (B,) int
    delta: Array  # (B, d)


class KVPrefix(NamedTuple):
    """Cached attention keys/values of the positions before each row's suffix.

    k, v:    (n, B, P, Hkv, hd) one slice per block run (after rotary, as ``layers.qkv_proj`` returns)
    allowed: (B, P) bool, True on the cached positions a suffix token may see (before its row's start)
    """

    k: Array
    v: Array
    allowed: Array


class ForwardOut(NamedTuple):
    logits: Array | None  # (B, T, V) float32, or None when stop_layer is set
    hidden: Array | None  # (n_taps, B, P, d) block outputs at tap layers / positions
    keys: Array | None  # (n_taps, B, P, d_k) keys at tap layers / positions
    last_hidden: Array  # (B, T, d) hidden state after the last block run


def layer_params(params: Params, i: int | Array) -> Params:
    """One layer's slice of the stacked ``params['layers']`` (dynamic index, no copy)."""
    return jax.tree.map(lambda p: jax.lax.dynamic_index_in_dim(p, i, keepdims=False), params["layers"])


# The one place that names the edited weight's path (every family stores W_outᵀ there).
W_OUT_PATH: tuple[str, ...] = ("layers", "mlp", "fc_out", "kernel")


def w_out(params: Params, layers: int | Sequence[int]) -> Array:
    """The edited weight W_outᵀ of docs/FORMULAS.md §1 in Flax layout: (d_key, d_model) for one layer,
    (m, d_key, d_model) for a sequence of m layers."""
    k = functools.reduce(operator.getitem, W_OUT_PATH, params)
    return k[layers] if isinstance(layers, int) else k[jnp.asarray(tuple(layers), jnp.int32)]


def with_w_out(params: Params, layers: Sequence[int], values: Array, *, add: bool = False) -> Params:
    """A new param tree whose edited weights of ``layers`` are ``values`` (or incremented by them).

    values: (m, d_key, d_model), one per layer of ``layers`` (cast to the kernel dtype).  Only the
    stacked fc_out kernel is new; every other leaf is shared with ``params``, which is not modified.
    Works under jit (``layers`` a static tuple of ints).  Raises ValueError for a ``values`` shape other
    than (len(layers), d_key, d_model).
    """
    flat = traverse_util.flatten_dict(params)
    k = flat[W_OUT_PATH]
    if tuple(values.shape) != (len(layers), *k.shape[1:]):
        raise ValueError(f"fc_out values of shape {tuple(values.shape)} for layers {tuple(layers)}; "
                         f"expected {(len(layers), *k.shape[1:])}")
    idx, v = jnp.asarray(tuple(layers), jnp.int32), jnp.asarray(values, k.dtype)
    flat[W_OUT_PATH] = k.at[idx].add(v) if add else k.at[idx].set(v)
    return traverse_util.unflatten_dict(flat)


def embed(cfg: ModelConfig, params: Params, tokens: Array, ctx: Context) -> Array:
    """Token (+ learned position, ``BlockOptions.learned_positions``) embeddings: (B, T) -> (B, T, d)."""
    h = jnp.take(params["embed"]["wte"], tokens, axis=0)
    if block_options(cfg).learned_positions:
        h = h + jnp.take(params["embed"]["wpe"], ctx.positions, axis=0)
    return h.astype(cfg.dtype)


def head(cfg: ModelConfig, params: Params, h: Array) -> Array:
    """Final norm and LM head; logits in float32."""
    h = L.norm(cfg, params["ln_f"], h)
    if cfg.tie_embeddings:
        logits = h @ params["embed"]["wte"].astype(h.dtype).T
    else:
        logits = h @ params["lm_head"]["kernel"].astype(h.dtype)
    logits = L.f32(logits)
    if cfg.lm_head_bias:
        logits = logits + L.f32(params["lm_head"]["bias"])
    return logits


def _delta_for(w: WDeltas | None, layer: int) -> Array | None:
    if w is None or layer not in w.layers:
        return None
    return w.delta[w.layers.index(layer)]


def block_at(
    cfg: ModelConfig, params: Params, layer: int, h: Array, ctx: Context, w: WDeltas | None = None
) -> tuple[Array, Array]:
    """Run block ``layer`` (static). Returns (block output, keys at all positions)."""
    return L.block(cfg, layer_params(params, layer), h, ctx, _delta_for(w, layer))


def block_parts_at(
    cfg: ModelConfig, params: Params, layer: int, h: Array, ctx: Context, w: WDeltas | None = None,
    attn_add: Array | None = None, mlp_add: Array | None = None,
) -> tuple[Array, Array, Array, Array]:
    """Block ``layer`` with its attention / FFN outputs exposed and shifted by ``attn_add`` / ``mlp_add``
    (B, T, d) (``models.layers.block_parts``).  Returns (block output, keys, attention output, FFN output)."""
    return L.block_parts(cfg, layer_params(params, layer), h, ctx, _delta_for(w, layer), attn_add, mlp_add)


def ffn_output(cfg: ModelConfig, params: Params, layer: int, key: Array, w_out_delta: Array | None = None) -> Array:
    """The FFN output ``fc_out(key)`` of block ``layer`` (bias included): key (..., d_key) -> (..., d_model).
    ``w_out_delta`` (d_key, d_model) is added to the kernel (Flax (in, out) layout)."""
    return L.dense(layer_params(params, layer)["mlp"]["fc_out"], key, w_out_delta)


def run_layers(
    cfg: ModelConfig,
    params: Params,
    h: Array,
    ctx: Context,
    start: int,
    stop: int,
    w: WDeltas | None = None,
) -> Array:
    """Run blocks ``start..stop-1`` with a ``lax.scan`` over layer indices."""
    if stop <= start:
        return h
    edited = tuple(l for l in (w.layers if w is not None else ()) if start <= l < stop)
    if edited:
        table = jnp.full((cfg.n_layers,), -1, dtype=jnp.int32)
        for j, l in enumerate(w.layers):
            table = table.at[l].set(j)

    def body(x, i):
        lp = layer_params(params, i)
        delta = None
        if edited:
            slot = table[i]
            delta = w.delta[jnp.maximum(slot, 0)] * (slot >= 0).astype(w.delta.dtype)
        out, _ = L.block(cfg, lp, x, ctx, delta)
        return out, None

    step = jax.checkpoint(body, prevent_cse=False) if cfg.remat else body
    h, _ = jax.lax.scan(step, h, jnp.arange(start, stop))
    return h


def run_layers_kv(
    cfg: ModelConfig, params: Params, h: Array, ctx: Context, start: int, stop: int
) -> tuple[Array, tuple[Array, Array]]:
    """Run blocks ``start..stop-1`` (no hooks) over h (B, T, d); also return each block's attention
    (k, v), stacked (stop - start, B, T, Hkv, hd), for ``run_layers_after_prefix``."""

    def body(x, i):
        attn = lambda p, hn: L.attention_kv(cfg, p, hn, ctx)  # noqa: E731
        out, _, kv = L.block_with_attention(cfg, layer_params(params, i), x, attn)
        return out, kv

    return jax.lax.scan(body, h, jnp.arange(start, stop))


def suffix_positions(starts: Array, width: int, length: int) -> tuple[Array, Array]:
    """(index (B, width) = starts[b] + j clipped to [0, length), in_range (B, width) bool)."""
    idx = starts[:, None].astype(jnp.int32) + jnp.arange(width, dtype=jnp.int32)[None]
    return jnp.clip(idx, 0, length - 1), idx < length


def run_layers_after_prefix(
    cfg: ModelConfig,
    params: Params,
    x: Array,
    positions: Array,
    mask: Array,
    prefix: KVPrefix,
    start: int,
    stop: int,
) -> Array:
    """Run blocks ``start..stop-1`` over suffix tokens only, attending to a cached prefix.

    x: (B, S, d) hidden states entering block ``start`` at the suffix positions; positions (B, S)
    their absolute position ids (rotary); mask (B, S) real suffix tokens; ``prefix`` the keys and
    values of blocks ``start..stop-1`` (``prefix.k.shape[0] == stop - start``) at the positions
    before the suffix, from ``run_layers_kv``.  Returns (B, S, d): equal to the full-row forward
    at those positions when the prefix states do not depend on anything that changed.
    Raises ValueError when the cache does not hold ``stop - start`` blocks.
    """
    if stop <= start:
        return x
    if prefix.k.shape[0] != stop - start:
        raise ValueError(f"prefix cache holds {prefix.k.shape[0]} blocks; "
                         f"blocks {start}..{stop - 1} need {stop - start}")

    def body(h, xs):
        i, pk, pv = xs
        attn = lambda p, hn: (  # noqa: E731
            L.attention_after_prefix(cfg, p, hn, positions, mask, pk, pv, prefix.allowed), None)
        out, _, _ = L.block_with_attention(cfg, layer_params(params, i), h, attn)
        return out, None

    step = jax.checkpoint(body, prevent_cse=False) if cfg.remat else body
    h, _ = jax.lax.scan(step, x.astype(cfg.dtype), (jnp.arange(start, stop), prefix.k, prefix.v))
    return h


def gather_positions(x: Array, positions: Array) -> Array:
    """x: (B, T, ...) at positions (B, P) -> (B, P, ...)."""
    idx = positions.reshape(positions.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx.astype(jnp.int32), axis=1)


def forward(
    cfg: ModelConfig,
    params: Params,
    tokens: Array | None,
    mask: Array | None = None,
    *,
    w_out_deltas: WDeltas | None = None,
    add_at: AddAt | None = None,
    taps: tuple[int, ...] = (),
    tap_positions: Array | None = None,
    start_layer: int = 0,
    h_start: Array | None = None,
    stop_layer: int | None = None,
    segments: Array | None = None,
) -> ForwardOut:
    """Tokens -> logits with the editing hooks described in the module docstring.

    tokens: (B, T) int; mask: (B, T) (1 = real token; default all ones).
    With ``start_layer > 0`` pass ``h_start`` (B, T, d) = hidden state entering that layer.
    ``segments`` (B, T) int: packed rows (``layers.make_context``): each contiguous run of one id is
    a sequence of its own (own position ids, attention within it), as if run in a row alone.
    """
    if h_start is None:
        chex.assert_rank(tokens, 2)
        if mask is None:
            mask = jnp.ones(tokens.shape, dtype=bool)
        ctx = make_context(mask, segments)
        h = embed(cfg, params, tokens, ctx)
        if start_layer != 0:
            raise ValueError("start_layer > 0 needs h_start")
    else:
        chex.assert_rank(h_start, 3)
        if mask is None:
            mask = jnp.ones(h_start.shape[:2], dtype=bool)
        ctx = make_context(mask, segments)
        h = h_start.astype(cfg.dtype)
    stop = cfg.n_layers if stop_layer is None else stop_layer
    for l in taps:
        if not start_layer <= l < stop:
            raise ValueError(f"tap layer {l} outside the layers run [{start_layer}, {stop})")
    if tap_positions is None and taps:
        tap_positions = jnp.broadcast_to(jnp.arange(h.shape[1]), h.shape[:2])
    breakpoints = sorted(set(taps) | ({add_at.layer} if add_at is not None else set()))
    hidden, keys = {}, {}
    cur = start_layer
    for bp in breakpoints:
        if bp < cur or bp >= stop:
            raise ValueError(f"hook layer {bp} outside the layers run [{start_layer}, {stop})")
        h = run_layers(cfg, params, h, ctx, cur, bp, w_out_deltas)
        h, k = block_at(cfg, params, bp, h, ctx, w_out_deltas)
        if add_at is not None and bp == add_at.layer:
            onehot = jax.nn.one_hot(add_at.positions, h.shape[1], dtype=h.dtype)  # (B, T)
            h = h + onehot[:, :, None] * add_at.delta.astype(h.dtype)[:, None, :]
        if bp in taps:
            hidden[bp] = gather_positions(h, tap_positions)
            keys[bp] = gather_positions(k, tap_positions)
        cur = bp + 1
    h = run_layers(cfg, params, h, ctx, cur, stop, w_out_deltas)
    logits = head(cfg, params, h) if stop_layer is None else None
    stack = lambda d: jnp.stack([d[l] for l in taps]) if taps else None  # noqa: E731
    return ForwardOut(logits=logits, hidden=stack(hidden), keys=stack(keys), last_hidden=h)
