"""Fast KV-cached text generation (greedy and top-k sampling) on the model interface.

Used for the MEMIT-style context templates (docs/FORMULAS.md §2, ``metake_jax/templates.py``), sampling a corpus from the model for
the key statistics C_0 (docs/FORMULAS.md §4), CounterFact fluency generations (docs/FORMULAS.md §8) and greedy
answers to GLUE-style prompts (docs/FORMULAS.md §R8).

Design: prompts are LEFT-padded, so every row's next token goes to the same cache column.  One
jitted function runs a prefill pass over the (bucketed) prompt block, then a ``lax.scan`` over the
new tokens; each step runs the layer stack as a ``lax.scan`` over the stacked params (like
``models.interface.run_layers``) that reads the per-layer stacked KV cache
``(n_layers, B, T_max, n_kv_heads, hd)`` and returns the step's new k, v, written into the cache
once per step (in place on the scan carry).  Attention joins the cache and the new tokens with one
softmax (``_attend``), so no per-layer cache copy is made.  The block math is the one in
``models/layers.py`` (``block_with_attention`` with a cached attention built on ``qkv_proj``);
embedding and head are ``models.interface.embed`` / ``head``.

Reference conventions (docs/FORMULAS.md §R1, §R7: MEMIT ``util/generate.py::generate_fast``):
``max_out_len`` counts TOTAL tokens per text (prompt included); top-k sampling renormalises the
softmax over the k largest logits; no stop at EOS; decoded text is NFKD-normalised with ``"\\n\\n"``
replaced by a space and ``"<|endoftext|>"`` removed.
"""
from __future__ import annotations

import functools
import unicodedata
from typing import Any, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS

from models import layers as L
from models.config import ModelConfig
from models.interface import embed, head, layer_params
from models.layers import Context, make_context

Array = jax.Array
Params = dict[str, Any]

__all__ = ["Generation", "bucket_length", "generate", "generate_tokens", "host_array", "sample_texts"]

class Generation(NamedTuple):
    """tokens: (B, T0 + max_new_tokens) prompt followed by the new tokens.
    mask:   same shape, True on real tokens (prompt mask, then False after a row's EOS)."""

    tokens: Array
    mask: Array


# ----------------------------------------------------------------------------- buckets


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def bucket_length(n: int, *, min_len: int = 8, max_len: int | None = None, pow2_until: int = 256,
                  step: int = 128) -> int:
    """Padded width of a row of ``n`` tokens (the one bucketing rule of the repo): the next power of two
    ≥ ``min_len`` while ``n`` ≤ ``pow2_until``, then the next multiple of ``step``; never above
    ``max_len`` when given.  Prompts (here): powers of two from 8 up to 256, then multiples of 128;
    statistics documents (``metake_jax.stats.make_batches``): ``min_len=16, pow2_until=max_len``."""
    if n <= pow2_until:
        width = _next_pow2(max(n, min_len, 1))
    else:
        width = -(-n // step) * step
    return width if max_len is None else min(width, max_len)


def bucket_batch(n: int) -> int:
    """Batch bucket: powers of two up to 64, then multiples of 64."""
    if n <= 64:
        return _next_pow2(n)
    return -(-n // 64) * 64


def bucket_steps(n: int) -> int:
    """Number of decode steps actually run: a multiple of 8 (extra tokens are dropped)."""
    return -(-n // 8) * 8


# ----------------------------------------------------------------------------- cached decoder


def _attend(
    cfg: ModelConfig, q: Array, parts: Sequence[tuple[Array, Array, Array]]
) -> Array:
    """Softmax attention of q (B, Tq, H, hd) over the concatenation of key/value blocks.

    ``parts``: (k (B, Tk, Hkv, hd), v (B, Tk, Hkv, hd), allowed (B, Tq, Tk)) blocks — e.g. the
    cache and the new tokens — combined with one joint softmax, so the cache is never copied.
    GQA: query head j uses kv head j // (H / Hkv), as the ``jnp.repeat`` in ``layers.attention``.
    """
    b, tq, h, hd = q.shape
    kvh = cfg.kv_heads
    qg = q.reshape(b, tq, kvh, h // kvh, hd).astype(jnp.float32)
    neg = jnp.finfo(jnp.float32).min
    scores = []
    for k, _, allowed in parts:
        s = jnp.einsum("bqkgd,btkd->bkgqt", qg, k.astype(jnp.float32)) / jnp.sqrt(jnp.float32(hd))
        scores.append(jnp.where(allowed[:, None, None], s, neg))
    m = functools.reduce(jnp.maximum, [s.max(-1, keepdims=True) for s in scores])
    weights = [jnp.exp(s - m) for s in scores]
    den = functools.reduce(jnp.add, [w.sum(-1, keepdims=True) for w in weights])
    out = functools.reduce(jnp.add, [
        jnp.einsum("bkgqt,btkd->bkgqd", (w / den).astype(v.dtype), v) for w, (_, v, _) in zip(weights, parts)
    ])
    return out.transpose(0, 3, 1, 2, 4).reshape(b, tq, h * hd)


def _cached_attention(
    cfg: ModelConfig,
    p: Params,
    x: Array,
    positions: Array,
    new_allowed: Array,
    cache: tuple[Array, Array, Array] | None,
) -> tuple[Array, tuple[Array, Array]]:
    """Attention of the new tokens ``x`` (B, Tq, d) over one layer's cache and themselves.

    new_allowed (B, Tq, Tq): which new tokens each query sees; cache = (k, v (B, T_max, Hkv, hd),
    allowed (B, Tq, T_max)) or None (prefill).  Returns (output, this call's (k, v) for the cache).
    """
    q, k, v = L.qkv_proj(cfg, p, x, positions)
    parts = [(k, v, new_allowed)] if cache is None else [cache, (k, v, new_allowed)]
    out = _attend(cfg, q, parts)
    return L.dense(p["o"], out.astype(x.dtype)), (k.astype(cfg.dtype), v.astype(cfg.dtype))


def _run_cached(
    cfg: ModelConfig,
    params: Params,
    x: Array,
    positions: Array,
    new_allowed: Array,
    cache: tuple[Array, Array] | None = None,
    cache_allowed: Array | None = None,
) -> tuple[Array, tuple[Array, Array]]:
    """All blocks over ``x`` (B, Tq, d) as a ``lax.scan`` over layers, reading (not writing) the
    stacked cache (n_layers, B, T_max, Hkv, hd).  Returns (h, (k, v) stacked (n_layers, B, Tq, Hkv, hd))."""

    def body(h, layer):
        lc = None
        if cache is not None:
            kc, vc = (jax.lax.dynamic_index_in_dim(c, layer, keepdims=False) for c in cache)
            lc = (kc, vc, cache_allowed)
        attn = functools.partial(
            _cached_attention, cfg, positions=positions, new_allowed=new_allowed, cache=lc
        )
        out, _, kv = L.block_with_attention(cfg, layer_params(params, layer), h, attn)
        return out, kv

    return jax.lax.scan(body, x, jnp.arange(cfg.n_layers))


def _choose(
    logits: Array, step: Array, row_keys: Array | None, top_k: int | None, temperature: Array
) -> Array:
    """Greedy argmax, or top-k multinomial (softmax renormalised over the k largest logits)."""
    if top_k is None:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    vals, idx = jax.lax.top_k(logits / temperature, top_k)
    keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)
    pick = jax.vmap(jax.random.categorical)(keys, vals)
    return jnp.take_along_axis(idx, pick[:, None], axis=1)[:, 0].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new", "top_k", "eos", "pad"))
def _generate_jit(
    cfg: ModelConfig,
    params: Params,
    tokens: Array,
    mask: Array,
    row_keys: Array | None,
    temperature: Array,
    *,
    max_new: int,
    top_k: int | None,
    eos: int | None,
    pad: int,
) -> tuple[Array, Array]:
    b, t0 = tokens.shape
    ctx = make_context(mask)

    # prefill: the whole prompt block, then its k, v become cache columns [0, t0)
    causal = jnp.tril(jnp.ones((t0, t0), bool))
    x = embed(cfg, params, tokens, ctx)
    x, (k, v) = _run_cached(cfg, params, x, ctx.positions, causal[None] & ctx.mask[:, None, :])
    widths = ((0, 0), (0, 0), (0, max_new), (0, 0), (0, 0))
    cache = (jnp.pad(k, widths), jnp.pad(v, widths))  # (n_layers, B, t_max, Hkv, hd)
    cmask = jnp.pad(ctx.mask, ((0, 0), (0, max_new)))
    logits = head(cfg, params, x[:, -1:])[:, 0]  # last column = last real token (left padding)
    pos = ctx.mask.sum(-1).astype(jnp.int32)  # position id of the next token

    def pick(logits, step, done):
        tok = _choose(logits, step, row_keys, top_k, temperature)
        if eos is None:
            return tok, jnp.ones_like(done), done
        tok = jnp.where(done, jnp.int32(pad), tok)
        return tok, ~done, done | (tok == eos)

    def step(carry, i):
        cache, cmask, pos, logits, done = carry
        tok, real, done = pick(logits, i, done)
        step_ctx = Context(positions=pos[:, None], mask=real[:, None])
        x = embed(cfg, params, tok[:, None], step_ctx)
        x, (k, v) = _run_cached(
            cfg, params, x, step_ctx.positions, jnp.ones((b, 1, 1), bool), cache, cmask[:, None, :]
        )
        col = t0 + i
        cache = tuple(jax.lax.dynamic_update_slice(c, n, (0, 0, col, 0, 0)) for c, n in zip(cache, (k, v)))
        cmask = jax.lax.dynamic_update_slice(cmask, real[:, None], (0, col))
        logits = head(cfg, params, x)[:, 0]
        return (cache, cmask, pos + real.astype(jnp.int32), logits, done), (tok, real)

    done0 = jnp.zeros((b,), bool)
    carry, (toks, reals) = jax.lax.scan(
        step, (cache, cmask, pos, logits, done0), jnp.arange(max_new - 1, dtype=jnp.int32)
    )
    _, _, _, logits, done = carry
    last_tok, last_real, _ = pick(logits, jnp.int32(max_new - 1), done)
    toks = jnp.concatenate([toks.T, last_tok[:, None]], axis=1)
    reals = jnp.concatenate([reals.T, last_real[:, None]], axis=1)
    return jnp.concatenate([tokens, toks], 1), jnp.concatenate([ctx.mask, reals], 1)


# ----------------------------------------------------------------------------- multi-process placement


def host_array(x: Any) -> np.ndarray:
    """``x`` as a numpy array on this host.  A global array of a multi-process run is read from this
    process's copy when replicated (``addressable_data(0)``) and all-gathered otherwise
    (``multihost_utils.process_allgather``: every process must make the same call)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _placer(params: Params):
    """Host inputs of the jitted decoder: ``jnp.asarray``, or — when ``params`` span several processes
    — replicated global arrays on their mesh (every process passes the same values, so every process
    runs the same program on the same data and obtains the same tokens)."""
    mesh = None
    for x in jax.tree.leaves(params):
        sh = getattr(x, "sharding", None)
        if isinstance(sh, NamedSharding) and not x.is_fully_addressable:
            mesh = sh.mesh
            break
    if mesh is None:
        return jnp.asarray
    rep = NamedSharding(mesh, PS())

    def put(x: Any) -> Array:
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, rep, lambda idx: host[idx])

    return put


# ----------------------------------------------------------------------------- public API


def _row_keys(rng: Any, b: int) -> Array:
    """One typed PRNG key per row: ``fold_in(rng, row)`` for a single key, or the given (B,) keys."""
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        if rng.dtype != jnp.uint32 or rng.shape[-1:] != (2,):
            raise ValueError(
                f"rng must be a jax PRNG key (typed, or raw uint32 (..., 2)); got {rng.dtype} {rng.shape}"
            )
        rng = jax.random.wrap_key_data(rng)
    if rng.ndim == 0:
        return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(b))
    if rng.shape != (b,):
        raise ValueError(f"rng: expected one key or {b} per-row keys, got key array of shape {rng.shape}")
    return rng


def generate(
    cfg: ModelConfig,
    params: Params,
    tokens: Any,
    mask: Any,
    *,
    max_new_tokens: int,
    rng: Any = None,
    top_k: int | None = None,
    temperature: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> Generation:
    """Generate ``max_new_tokens`` after LEFT-padded prompts; see ``generate_tokens``.

    Returns ``Generation(tokens, mask)`` where ``mask`` marks real tokens (False on prompt padding
    and on what follows a row's EOS, which is filled with ``pad_token_id``, default the EOS id).
    """
    tokens = np.asarray(tokens)
    mask = np.asarray(mask).astype(bool)
    chex.assert_rank(tokens, 2)
    chex.assert_equal_shape([tokens, mask])
    b, t0 = tokens.shape
    if b == 0:
        raise ValueError("generate: empty batch (tokens has 0 rows)")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if not mask.any(-1).all():
        empty = np.flatnonzero(~mask.any(-1)).tolist()
        raise ValueError(f"generate: prompt row(s) {empty[:8]} have no real token")
    if (np.diff(mask.astype(np.int8), axis=-1) < 0).any():
        bad = np.flatnonzero((np.diff(mask.astype(np.int8), axis=-1) < 0).any(-1)).tolist()
        raise ValueError(f"generate: prompts must be LEFT-padded (mask 0...0 1...1); rows {bad[:8]} are not")
    if (tokens < 0).any() or (tokens >= cfg.vocab_size).any():
        raise ValueError(f"generate: token ids must lie in [0, {cfg.vocab_size}) (vocab_size of {cfg.name})")
    longest = int(mask.sum(-1).max()) + max_new_tokens
    if longest > cfg.max_positions:
        raise ValueError(
            f"generate: {longest} positions needed, {cfg.name} has max_positions={cfg.max_positions}"
        )
    if top_k is not None:
        if not 1 <= top_k <= cfg.vocab_size:
            raise ValueError(f"generate: top_k must be in [1, {cfg.vocab_size}], got {top_k}")
        if rng is None:
            raise ValueError("generate: top-k sampling needs rng (a PRNG key) for reproducibility")
        if not temperature > 0:
            raise ValueError(f"generate: temperature must be > 0, got {temperature}")
    if max_new_tokens == 0:
        return Generation(jnp.asarray(tokens, jnp.int32), jnp.asarray(mask))
    pad = eos_token_id if pad_token_id is None else pad_token_id
    pad = 0 if pad is None else int(pad)

    # bucket the static shapes: batch rows of dummies, prompt columns of left padding, steps of 8
    bb, tb, nb = bucket_batch(b), bucket_length(t0), bucket_steps(max_new_tokens)
    tok_p = np.full((bb, tb), pad, np.int32)
    mask_p = np.zeros((bb, tb), bool)
    tok_p[:b, tb - t0:] = tokens
    mask_p[:b, tb - t0:] = mask
    mask_p[b:, -1] = True  # dummy rows: one real token
    keys = None
    if top_k is not None:
        keys = _row_keys(rng, b)
        if bb > b:
            keys = jnp.concatenate([keys, jnp.broadcast_to(keys[:1], (bb - b,))])
    place = _placer(params)
    out_tok, out_mask = _generate_jit(
        cfg, params, place(tok_p), place(mask_p), None if keys is None else place(keys),
        place(np.float32(temperature)),
        max_new=nb, top_k=top_k, eos=None if eos_token_id is None else int(eos_token_id), pad=pad,
    )
    sl = (slice(0, b), slice(tb - t0, tb + max_new_tokens))
    return Generation(out_tok[sl], out_mask[sl])


def generate_tokens(
    cfg: ModelConfig,
    params: Params,
    tokens: Any,
    mask: Any,
    *,
    max_new_tokens: int,
    rng: Any = None,
    top_k: int | None = None,
    temperature: float = 1.0,
    eos_token_id: int | None = None,
) -> Array:
    """KV-cached generation after LEFT-padded prompts -> tokens (B, T0 + max_new_tokens).

    tokens, mask: (B, T0), mask 0 on the left padding (position ids ``cumsum(mask) - 1`` as in
    ``make_context``).  Greedy (argmax) when ``top_k`` is None, else top-k multinomial sampling
    of ``softmax(logits / temperature)`` renormalised over the k largest, with ``rng`` (one key,
    split per row with ``fold_in(rng, row)``, or (B,) per-row keys): the same key gives the same
    tokens.  After a row emits ``eos_token_id`` it keeps emitting the EOS id (use ``generate``
    for the mask of real tokens).  Shapes are bucketed so few programs get compiled.
    """
    return generate(
        cfg, params, tokens, mask, max_new_tokens=max_new_tokens, rng=rng, top_k=top_k,
        temperature=temperature, eos_token_id=eos_token_id,
    ).tokens


# ----------------------------------------------------------------------------- text helpers


def _clean(text: str) -> str:
    """The reference ``generate_fast`` post-processing (NFKD, "\\n\\n" -> " ", no "<|endoftext|>")."""
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ").replace("<|endoftext|>", "")


def _encode(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    ids = [list(x) for x in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    for i, x in enumerate(ids):
        if not x:  # unconditional prompt (e.g. "" with GPT-2): start from BOS / EOS like HF does
            if start is None:
                raise ValueError(
                    f"sample_texts: prompt {i} ({prompts[i]!r}) is empty and the tokenizer has no BOS/EOS"
                )
            x.append(int(start))
    return ids


def sample_texts(
    cfg: ModelConfig,
    params: Params,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_out_len: int,
    top_k: int | None = 5,
    seed: int = 0,
    batch_size: int = 64,
    skip_special_tokens: bool = True,
    temperature: float = 1.0,
    eos_token_id: int | None = None,
    clean: bool = True,
) -> list[str]:
    """Texts (prompt + continuation) of ``max_out_len`` TOTAL tokens each, the reference
    ``generate_fast`` convention (docs/FORMULAS.md §R1, §R7).

    ``top_k=None`` is greedy.  Row i samples with ``fold_in(PRNGKey(seed), i)``, so the result
    does not depend on ``batch_size``.  ``eos_token_id`` (default None = no stop, as the
    reference) ends a text at its EOS.  ``clean`` applies the reference text post-processing.
    """
    if isinstance(prompts, str):
        raise TypeError("sample_texts: prompts must be a list of strings, not one string")
    if batch_size < 1:
        raise ValueError(f"sample_texts: batch_size must be >= 1, got {batch_size}")
    if not prompts:
        return []
    ids = _encode(tokenizer, prompts)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    base = jax.random.key(seed)
    texts: list[str] = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        lens = np.array([len(x) for x in chunk])
        t0 = int(lens.max())
        n_new = max_out_len - int(lens.min())
        new_tokens: list[list[int]] = [[] for _ in chunk]
        if n_new > 0:
            toks = np.full((len(chunk), t0), pad, np.int32)
            mask = np.zeros((len(chunk), t0), bool)
            for r, x in enumerate(chunk):
                toks[r, t0 - len(x):] = x
                mask[r, t0 - len(x):] = True
            keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(start, start + len(chunk)))
            out = generate(
                cfg, params, toks, mask, max_new_tokens=n_new, rng=keys if top_k is not None else None,
                top_k=top_k, temperature=temperature, eos_token_id=eos_token_id,
            )
            out_tok, out_mask = host_array(out.tokens)[:, t0:], host_array(out.mask)[:, t0:]
            for r, n in enumerate(lens):
                keep = max(0, max_out_len - int(n))
                new_tokens[r] = out_tok[r, :keep][out_mask[r, :keep]].tolist()
        for x, new in zip(chunk, new_tokens):
            text = tokenizer.decode(x + new, skip_special_tokens=skip_special_tokens)
            texts.append(_clean(text) if clean else text)
    return texts
