"""The generic transformer block as pure functions over one layer's params.

Each function takes ``lp`` = one layer's slice of ``params['layers']`` (layout:
``models/families/base.py``) and returns the block output and the MLP key (docs/FORMULAS.md §1: the input
of the FFN output projection ``fc_out``).  How the block runs (norm, rotary, parallel or
sequential, gated MLP) is the family's ``BlockOptions`` (``models.families.block_options(cfg)``);
no function here names a family.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.families import block_options

Array = jax.Array
Params = dict[str, Any]


class Context(NamedTuple):
    """Token bookkeeping shared by every layer of one forward pass.

    positions: (B, T) int32 position ids (left padding aware; per segment when packed).
    mask:      (B, T) bool, True on real tokens.
    segments:  (B, T) int32 or None: packed rows — several sequences side by side in one row, each a
               contiguous run of one segment id; a token attends only within its own segment.
    """

    positions: Array
    mask: Array
    segments: Array | None = None


def make_context(mask: Array, segments: Array | None = None) -> Context:
    """Position ids ``cumsum(mask) - 1`` (0 on padding): right and left padding both work.  With
    ``segments`` (B, T) (packed rows: contiguous runs of one id), the count restarts at each segment,
    so every packed sequence gets the position ids it has alone."""
    mask = jnp.asarray(mask).astype(bool)
    count = jnp.cumsum(mask.astype(jnp.int32), axis=-1)
    if segments is not None:
        segments = jnp.asarray(segments, jnp.int32)
        starts = jnp.concatenate([jnp.ones_like(segments[:, :1], bool), segments[:, 1:] != segments[:, :-1]], -1)
        before = jnp.where(starts, count - mask.astype(jnp.int32), 0)  # real tokens before each segment
        count = count - jax.lax.cummax(before, axis=1)
    positions = jnp.maximum(count - 1, 0)
    return Context(positions=positions.astype(jnp.int32), mask=mask, segments=segments)


# ----------------------------------------------------------------------------- primitives


def f32(x: Array) -> Array:
    """Upcast to at least float32 (float64 stays float64, for finite-difference checks)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def layer_norm(p: Params, x: Array, eps: float) -> Array:
    x32 = f32(x)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    y = y * f32(p["scale"]) + f32(p["bias"])
    return y.astype(x.dtype)


def rms_norm(p: Params, x: Array, eps: float) -> Array:
    x32 = f32(x)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + eps)
    return (f32(p["scale"]) * y).astype(x.dtype)


def norm(cfg: ModelConfig, p: Params, x: Array) -> Array:
    """The family's norm (LayerNorm or RMSNorm, ``BlockOptions.norm``) over the last axis."""
    if block_options(cfg).norm == "rms":
        return rms_norm(p, x, cfg.norm_eps)
    return layer_norm(p, x, cfg.norm_eps)


def dense(p: Params, x: Array, delta: Array | None = None) -> Array:
    kernel = p["kernel"].astype(x.dtype)
    if delta is not None:
        kernel = kernel + delta.astype(x.dtype)
    y = x @ kernel
    if "bias" in p:
        y = y + p["bias"].astype(x.dtype)
    return y


def gelu_new(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {"gelu_new": gelu_new, "silu": jax.nn.silu}


# ----------------------------------------------------------------------------- rotary


def _rope_angles(positions: Array, rot: int, theta: float) -> Array:
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rot, 2, dtype=jnp.float32) / rot))
    return positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, rot/2)


def rope_half(x: Array, positions: Array, theta: float, rot_dim: int | None = None) -> Array:
    """NeoX/Llama rotary on the first ``rot_dim`` dims (default all), their two halves rotated
    together (pair (i, i + rot_dim/2)); the other dims pass through.  x: (B, T, H, hd)."""
    rd = rot_dim or x.shape[-1]
    ang = _rope_angles(positions, rd, theta)
    cos = jnp.concatenate([jnp.cos(ang)] * 2, -1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(ang)] * 2, -1)[:, :, None, :]
    x32 = f32(x)
    xr, xp = x32[..., :rd], x32[..., rd:]
    x1, x2 = xr[..., : rd // 2], xr[..., rd // 2 :]
    xr = xr * cos + jnp.concatenate([-x2, x1], -1) * sin
    return (jnp.concatenate([xr, xp], -1) if xp.shape[-1] else xr).astype(x.dtype)


def rope_interleaved(x: Array, positions: Array, rot_dim: int, theta: float) -> Array:
    """GPT-J rotary on the first ``rot_dim`` dims, pairs (2i, 2i+1) rotated together."""
    ang = _rope_angles(positions, rot_dim, theta)
    cos = jnp.repeat(jnp.cos(ang), 2, axis=-1)[:, :, None, :]
    sin = jnp.repeat(jnp.sin(ang), 2, axis=-1)[:, :, None, :]
    x32 = f32(x)
    xr, xp = x32[..., :rot_dim], x32[..., rot_dim:]
    x1, x2 = xr[..., 0::2], xr[..., 1::2]
    rotated = jnp.stack([-x2, x1], axis=-1).reshape(xr.shape)
    xr = xr * cos + rotated * sin
    return jnp.concatenate([xr, xp], -1).astype(x.dtype)


# ----------------------------------------------------------------------------- attention


def qkv_proj(cfg: ModelConfig, p: Params, x: Array, positions: Array) -> tuple[Array, Array, Array]:
    """Attention projections with qk-norm and rotary applied (before any GQA head repeat).

    x: (B, T, d); positions: (B, T) position ids.  Returns q (B, T, H, hd) and k, v
    (B, T, Hkv, hd).  Shared by ``attention`` and the KV-cached decoder (models/generate.py).
    """
    b, t, _ = x.shape
    h, kvh, hd = cfg.n_heads, cfg.kv_heads, cfg.hd
    q = dense(p["q"], x).reshape(b, t, h, hd)
    k = dense(p["k"], x).reshape(b, t, kvh, hd)
    v = dense(p["v"], x).reshape(b, t, kvh, hd)
    if cfg.qk_norm:
        q = rms_norm(p["q_norm"], q, cfg.norm_eps)
        k = rms_norm(p["k_norm"], k, cfg.norm_eps)
    rope, rd = block_options(cfg).rope, cfg.rotary_dim or hd
    if rope == "half":
        q = rope_half(q, positions, cfg.rope_theta, rd)
        k = rope_half(k, positions, cfg.rope_theta, rd)
    elif rope == "interleaved":
        q = rope_interleaved(q, positions, rd, cfg.rope_theta)
        k = rope_interleaved(k, positions, rd, cfg.rope_theta)
    return q, k, v


def attend(cfg: ModelConfig, q: Array, k: Array, v: Array, allowed: Array) -> Array:
    """Softmax attention: q (B, Tq, H, hd) over k, v (B, Tk, Hkv, hd) where ``allowed`` (B, Tq, Tk)
    is True; returns (B, Tq, H·hd).  GQA: kv head j serves query heads j·H/Hkv … (j+1)·H/Hkv - 1.

    Every query must be allowed at least one key (a fully masked query gets a uniform average).
    """
    b, tq, h, hd = q.shape
    if k.shape[2] != h:
        k = jnp.repeat(k, h // k.shape[2], axis=2)
        v = jnp.repeat(v, h // v.shape[2], axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", f32(q), f32(k))
    scores = scores / jnp.sqrt(jnp.asarray(hd, scores.dtype))
    scores = jnp.where(allowed[:, None], scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, tq, h * hd)


def causal_allowed(mask: Array, segments: Array | None = None) -> Array:
    """(B, T) real-token mask -> (B, T, T): query t sees real keys at positions <= t (of its own
    segment when ``segments`` (B, T) is given)."""
    t = mask.shape[1]
    allowed = jnp.tril(jnp.ones((t, t), dtype=bool))[None] & mask[:, None, :]
    if segments is not None:
        allowed = allowed & (segments[:, :, None] == segments[:, None, :])
    return allowed


def attention(cfg: ModelConfig, p: Params, x: Array, ctx: Context) -> Array:
    q, k, v = qkv_proj(cfg, p, x, ctx.positions)
    return dense(p["o"], attend(cfg, q, k, v, causal_allowed(ctx.mask, ctx.segments)))


def attention_kv(cfg: ModelConfig, p: Params, x: Array, ctx: Context) -> tuple[Array, tuple[Array, Array]]:
    """``attention`` that also returns this layer's (k, v), each (B, T, Hkv, hd) after rotary."""
    q, k, v = qkv_proj(cfg, p, x, ctx.positions)
    return dense(p["o"], attend(cfg, q, k, v, causal_allowed(ctx.mask, ctx.segments))), (k, v)


def attention_after_prefix(
    cfg: ModelConfig, p: Params, x: Array, positions: Array, mask: Array,
    prefix_k: Array, prefix_v: Array, prefix_allowed: Array,
) -> Array:
    """Attention of suffix tokens over a cached prefix and themselves (docs/FORMULAS.md §3, prefix reuse).

    x: (B, S, d) suffix inputs at absolute ``positions`` (B, S); mask (B, S) real suffix tokens;
    prefix_k / prefix_v (B, P, Hkv, hd) keys/values (after rotary) of the positions before the
    suffix; prefix_allowed (B, P) which of them are real.  Every suffix query sees every allowed
    prefix key and the real suffix keys up to itself — the same set causal attention over the
    whole row gives it, so the output equals ``attention`` on the full row at those positions.
    """
    q, k, v = qkv_proj(cfg, p, x, positions)
    s = x.shape[1]
    allowed = jnp.concatenate(
        [jnp.broadcast_to(prefix_allowed[:, None, :], (x.shape[0], s, prefix_k.shape[1])), causal_allowed(mask)],
        axis=-1)
    kk = jnp.concatenate([prefix_k.astype(k.dtype), k], axis=1)
    vv = jnp.concatenate([prefix_v.astype(v.dtype), v], axis=1)
    return dense(p["o"], attend(cfg, q, kk, vv, allowed))


# ----------------------------------------------------------------------------- MLP


def mlp_key(cfg: ModelConfig, p: Params, x: Array) -> Array:
    """The key k = input of fc_out (docs/FORMULAS.md §1); x: (B, T, d) normed MLP input -> (B, T, d_key)."""
    opts = block_options(cfg)
    act = ACTIVATIONS[opts.activation]
    if opts.gated_mlp:
        return act(dense(p["gate"], x)) * dense(p["up"], x)
    return act(dense(p["fc_in"], x))


def block_with_attention(
    cfg: ModelConfig,
    lp: Params,
    x: Array,
    attn_fn: Callable[[Params, Array], tuple[Array, Any]],
    w_out_delta: Array | None = None,
) -> tuple[Array, Array, Any]:
    """One transformer block with a pluggable attention: ``attn_fn(attn_params, normed_x) ->
    (attention output, aux)``.  Returns (block output h_l, key k_l, aux).  ``block`` uses the
    plain causal ``attention``; the KV-cached decoder (models/generate.py) passes a cached one.
    """
    if block_options(cfg).parallel:
        hn = norm(cfg, lp["ln_1"], x)
        key = mlp_key(cfg, lp["mlp"], hn)
        a, aux = attn_fn(lp["attn"], hn)
        out = x + a + dense(lp["mlp"]["fc_out"], key, w_out_delta)
        return out, key, aux
    a, aux = attn_fn(lp["attn"], norm(cfg, lp["ln_1"], x))
    x = x + a
    key = mlp_key(cfg, lp["mlp"], norm(cfg, lp["ln_2"], x))
    return x + dense(lp["mlp"]["fc_out"], key, w_out_delta), key, aux


def block(
    cfg: ModelConfig, lp: Params, x: Array, ctx: Context, w_out_delta: Array | None = None
) -> tuple[Array, Array]:
    """One transformer block. Returns (block output h_l, key k_l at every position).

    ``w_out_delta`` (d_k, d) is added to the fc_out kernel (Flax (in, out) layout) for this call.
    """
    out, key, _ = block_with_attention(
        cfg, lp, x, lambda p, hn: (attention(cfg, p, hn, ctx), None), w_out_delta
    )
    return out, key


def block_parts(
    cfg: ModelConfig, lp: Params, x: Array, ctx: Context, w_out_delta: Array | None = None,
    attn_add: Array | None = None, mlp_add: Array | None = None,
) -> tuple[Array, Array, Array, Array]:
    """``block`` with the attention output and the FFN output exposed and shiftable (PMET's Stage I).

    ``attn_add`` / ``mlp_add`` (B, T, d) are added to the attention output (after its output projection)
    and to the FFN output (after ``fc_out``) before they enter the residual stream.  Returns
    (block output h_l, key k_l, attention output a_l, FFN output m_l), each (B, T, ·), a_l and m_l with
    the additions included.  With both additions None it computes exactly what ``block`` computes.
    """
    parallel = block_options(cfg).parallel
    hn = norm(cfg, lp["ln_1"], x)
    a = attention(cfg, lp["attn"], hn, ctx)
    if attn_add is not None:
        a = a + attn_add.astype(a.dtype)
    if parallel:
        key = mlp_key(cfg, lp["mlp"], hn)
    else:
        x = x + a
        key = mlp_key(cfg, lp["mlp"], norm(cfg, lp["ln_2"], x))
    m = dense(lp["mlp"]["fc_out"], key, w_out_delta)
    if mlp_add is not None:
        m = m + mlp_add.astype(m.dtype)
    return (x + a + m if parallel else x + m), key, a, m
