"""Batched, jitted teacher-forced scoring of (prefix, target) continuations (docs/FORMULAS.md §8).

Every benchmark metric reduces to: for each pair, the mean NLL of the target tokens after the
prefix, whether the argmax equals every target token, and the argmax tokens themselves.  All
pairs are tokenized up front, sorted by length and packed into buckets with static shapes
(rows: a power of two up to ``batch_size``; length: a power of two >= 8; target slots: a power
of two >= 4), and each bucket is scored by one jitted call — there is no per-prompt model call.

Tokenization: ``metake_jax.tokens.encode_pairs`` (BOS-aware; the rows Stage I trains on), so the
reference's Llama special case (docs/FORMULAS.md §R7) falls out without a family switch.  Callers pass
(prefix, continuation) texts from ``metake_jax.requests.join_target`` (GLUE: the reference's
``target_text``); nothing is added here.

The model interface is ``models.interface.forward``; only the hidden states at the predicting
positions go through the LM head (``head``), which equals slicing ``forward(...).logits``.

On a mesh (params placed by ``sharding.shard_params``) each bucket's rows are split over its
``data`` axis (``sharding.shard_rows``) and the per-row results are read back with
``sharding.to_host`` — in a multi-process run every process calls the same jitted steps on the
same global arrays and ends with the same numbers.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from metake_jax.sharding import mesh_of, shard_rows, to_host
from metake_jax.tokens import encode_pairs
from models.config import ModelConfig
from models.interface import WDeltas, forward, gather_positions, head

__all__ = ["PairScores", "encode_pairs", "score_pairs", "score_rows", "target_logprobs", "token_stats"]

Array = jax.Array


class PairScores(NamedTuple):
    """Per-pair results, in the order the pairs were given."""

    mean_nll: np.ndarray  # (n,) float64: mean over target tokens of -log p
    all_correct: np.ndarray  # (n,) bool: argmax == every target token
    n_correct: np.ndarray  # (n,) int: target tokens whose argmax matched
    n_tokens: np.ndarray  # (n,) int: target tokens
    argmax: list[np.ndarray]  # per pair, the argmax ids at the target positions
    target_ids: list[list[int]]  # per pair, the target ids scored


# ----------------------------------------------------------------------------- pure math


def token_stats(logits: Array, tgt_ids: Array, tgt_mask: Array) -> tuple[Array, Array, Array]:
    """Per-row statistics from the logits at the predicting positions.

    logits (B, K, V): logits whose argmax / softmax predicts ``tgt_ids`` (B, K); ``tgt_mask`` (B, K)
    marks real target slots.  Returns (sum of -log p over real slots (B,), number of real slots
    whose argmax equals the target (B,), argmax ids (B, K)).
    """
    chex.assert_rank(logits, 3)
    chex.assert_equal_shape([tgt_ids, tgt_mask])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    tok_lp = jnp.take_along_axis(logp, tgt_ids[..., None].astype(jnp.int32), axis=-1)[..., 0]
    m = tgt_mask.astype(jnp.float32)
    sum_nll = -(tok_lp * m).sum(-1)
    am = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    n_correct = ((am == tgt_ids) & tgt_mask.astype(bool)).sum(-1)
    return sum_nll, n_correct, am


@functools.partial(jax.jit, static_argnames=("cfg", "delta_layers"))
def _score_bucket(
    cfg: ModelConfig,
    params: Any,
    tokens: Array,
    mask: Array,
    pred_pos: Array,
    tgt_ids: Array,
    tgt_mask: Array,
    delta: Array | None,
    delta_layers: tuple[int, ...] | None,
) -> tuple[Array, Array, Array]:
    w = WDeltas(delta_layers, delta) if delta_layers is not None else None
    out = forward(cfg, params, tokens, mask, w_out_deltas=w, stop_layer=cfg.n_layers)
    h = gather_positions(out.last_hidden, pred_pos)  # (B, K, d)
    return token_stats(head(cfg, params, h), tgt_ids, tgt_mask)


def _pow2(n: int, lo: int) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


def score_rows(
    cfg: ModelConfig,
    params: Any,
    rows: Sequence[Sequence[int]],
    starts: Sequence[int],
    *,
    batch_size: int = 32,
    pad_id: int = 0,
    w_out_deltas: WDeltas | None = None,
) -> PairScores:
    """Score token rows whose targets are ``row[start:]`` (bucketed, one jitted call per bucket)."""
    n = len(rows)
    if n != len(starts):
        raise ValueError(f"{n} rows but {len(starts)} starts")
    if n == 0:
        return PairScores(np.zeros(0), np.zeros(0, bool), np.zeros(0, int), np.zeros(0, int), [], [])
    lengths = np.array([len(r) for r in rows])
    st = np.array(starts)
    if (st < 1).any() or (st >= lengths).any():
        bad = int(np.flatnonzero((st < 1) | (st >= lengths))[0])
        raise ValueError(f"row {bad}: target start {st[bad]} outside [1, {lengths[bad]})")
    if lengths.max() > cfg.max_positions:
        bad = int(lengths.argmax())
        raise ValueError(f"row {bad} has {lengths[bad]} tokens > model max_positions {cfg.max_positions}")
    bmax = _pow2(max(1, batch_size), 1)
    order = np.argsort(lengths, kind="stable")
    sum_nll = np.zeros(n)
    n_corr = np.zeros(n, dtype=np.int64)
    amax: list[np.ndarray] = [np.zeros(0, np.int32)] * n
    delta = None if w_out_deltas is None else w_out_deltas.delta
    dl = None if w_out_deltas is None else tuple(int(l) for l in w_out_deltas.layers)
    mesh = mesh_of(params)
    for b0 in range(0, n, bmax):
        idx = order[b0 : b0 + bmax]
        B = min(bmax, _pow2(len(idx), 8))
        T = min(_pow2(int(lengths[idx].max()), 8), max(int(lengths[idx].max()), cfg.max_positions))
        K = _pow2(int((lengths[idx] - st[idx]).max()), 4)
        tokens = np.full((B, T), pad_id, np.int32)
        mask = np.zeros((B, T), bool)
        pred_pos = np.zeros((B, K), np.int32)
        tgt = np.zeros((B, K), np.int32)
        tmask = np.zeros((B, K), bool)
        for j, i in enumerate(idx):
            r = rows[i]
            tokens[j, : len(r)] = r
            mask[j, : len(r)] = True
            k = len(r) - st[i]
            pred_pos[j, :k] = np.arange(st[i] - 1, len(r) - 1)
            tgt[j, :k] = r[st[i] :]
            tmask[j, :k] = True
        mask[len(idx) :, 0] = True  # padding rows: one real token keeps softmax finite
        ins = shard_rows((tokens, mask, pred_pos, tgt, tmask), mesh)  # rows over "data" (no mesh: jnp.asarray)
        s, c, a = _score_bucket(cfg, params, *ins, delta, dl)
        s, c, a = to_host(s).astype(np.float64), to_host(c), to_host(a)
        for j, i in enumerate(idx):
            sum_nll[i] = s[j]
            n_corr[i] = c[j]
            amax[i] = a[j, : lengths[i] - st[i]].copy()
    n_tok = lengths - st
    return PairScores(
        mean_nll=sum_nll / n_tok,
        all_correct=n_corr == n_tok,
        n_correct=n_corr,
        n_tokens=n_tok,
        argmax=amax,
        target_ids=[list(r[s_:]) for r, s_ in zip(rows, st)],
    )


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if isinstance(v, int):
            return v
    return 0


def score_pairs(
    cfg: ModelConfig,
    params: Any,
    tokenizer: Any,
    prefixes: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int = 32,
    w_out_deltas: WDeltas | None = None,
) -> PairScores:
    """Full per-pair scores for ``prefix + target`` (targets carry their own leading space)."""
    rows, starts = encode_pairs(tokenizer, prefixes, targets)
    return score_rows(cfg, params, rows, starts, batch_size=batch_size, pad_id=_pad_id(tokenizer),
                      w_out_deltas=w_out_deltas)


def target_logprobs(
    cfg: ModelConfig,
    params: Any,
    tokenizer: Any,
    prefixes: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int = 32,
    w_out_deltas: WDeltas | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(mean NLL per pair, argmax-equals-every-target-token per pair) — docs/FORMULAS.md §R7 scoring."""
    s = score_pairs(cfg, params, tokenizer, prefixes, targets, batch_size=batch_size, w_out_deltas=w_out_deltas)
    return s.mean_nll, s.all_correct
