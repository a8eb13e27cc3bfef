"""Stage I: upstream target optimization for a whole batch at once (docs/FORMULAS.md §3).

All ``n`` requests are optimized together in one jitted computation: each request has its own
δ_i (rows of a (n_pad, d) array), its own Adam moments (Adam is elementwise, so a batched Adam
equals n independent ones) and its own early-stop flag; the clamp is per request.  The layers
below ``L`` run once: their output is cached and every step starts the forward pass at ``L``.

Rows are run in ``row_groups`` length-sorted groups, each cut to its own (bucketed) width: rows
of one batch range from ~5 to ~24 tokens, so a single padded width wastes about half of the
compute; four groups keep ~75 % of the tokens real (bench/RESULTS.md, "Stage I row groups").
Grouping changes no number: every row's loss is the same function of its own tokens.

Norm reference (``StageIConfig.norm_ref``): the clamp and the weight decay are relative to ‖h_0‖, the
block-L output at the bare prompt's subject-last token (MEMIT, ``"block"``), or to ‖m_0‖, block L's
MLP output there (ROME ``compute_v.py``, ``"mlp"``).  ROME adds δ to the MLP output of layer L, which
changes the residual stream exactly as adding it to the block output, so only these two normalisers
differ; the targets stay z = h_0 + δ in block-output space (residual z − h_L = δ, as ROME's
``v* − m_0``).  ``"auto"`` is the editor's convention (``Editor.stage1_norm_ref``, resolved by
``runner.edit_config``), ``"block"`` when Stage I is called without an editor.

Prefix reuse (``StageIConfig.prefix_reuse``): δ enters at block L's output at the subject's last
token, so by causal attention every earlier position's state in the blocks above L is the same at
every Adam step.  Blocks ≤ L and the δ = 0 keys/values of the blocks above L are computed once per
batch; each step runs blocks L+1.. only over each row's suffix (from the subject's last token on,
at its absolute positions), attending to the cached prefix (``models.interface.run_layers_after_prefix``).
Rows are then grouped by suffix length.  The numbers are those of the full rows (tests/test_targets.py).

Compaction (``StageIConfig.compact``): requests that met the early-stop threshold cost nothing more.
The loop runs in phases; a phase stops once the active requests fit a smaller request bucket
(``tokens.bucket_requests``), and the host moves them, with their δ and Adam moments, into a
sub-batch of that size (``batch.take_requests``) for the next phase.  Adam is per element and the
loss a sum of per-request terms, so no number changes.

The same loss pieces (``edit_and_loc_losses``) are reused by MetaKE's virtual look-ahead (§6).

PMET's variant (``optimize_attn_ffn_targets``, docs/FORMULAS.md §4 "PMET") shifts block L's attention
and FFN outputs instead of its output and returns FFN-output targets; it runs the rows at one width.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metake_jax.batch import EditBatch, take_requests
from metake_jax.sharding import mesh_of, replicate, to_host
from metake_jax.tokens import bucket, bucket_requests
from models.config import ModelConfig
from models.interface import (
    AddAt, KVPrefix, WDeltas, block_at, block_parts_at, forward, gather_positions, head, make_context,
    run_layers_after_prefix, run_layers_kv, suffix_positions,
)
from models.layers import f32

Array = jax.Array

NORM_REFS = ("auto", "block", "mlp")


@dataclasses.dataclass(frozen=True)
class StageIConfig:
    """Reference hyper-parameters (docs/FORMULAS.md §R6): v_lr, v_num_grad_steps, clamp, KL, wd.

    ``norm_ref`` (docs/FORMULAS.md §3 "Norm reference"): what the clamp and the weight decay are relative
    to — ``"block"`` ‖h_0‖ (MEMIT), ``"mlp"`` ‖m_0‖ (ROME), ``"auto"`` the editor's convention
    (``Editor.stage1_norm_ref``; ``"block"`` without an editor).  Raises ValueError naming the field."""

    lr: float = 0.5
    steps: int = 25  # v_num_grad_steps: at most steps-1 Adam updates
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    early_stop: float = 5e-2
    row_groups: int = 4  # length-sorted row groups, each at its own width (1 = one padded width)
    prefix_reuse: bool = True  # steps run only from the subject's last token on (same numbers, less compute)
    compact: bool = True  # converged requests leave the batch: active rows move to a smaller bucket
    # clamp / weight-decay reference: "block" ‖h_0‖ (MEMIT) | "mlp" ‖m_0‖ (ROME) | "auto" the editor's
    norm_ref: str = "auto"

    def __post_init__(self) -> None:
        if int(self.row_groups) < 1:
            raise ValueError(f"stage1.row_groups must be >= 1, got {self.row_groups}")
        if self.norm_ref not in NORM_REFS:
            raise ValueError(f"stage1.norm_ref must be one of {', '.join(NORM_REFS)}, got {self.norm_ref!r}")

    @property
    def mlp_norm(self) -> bool:
        """Whether the clamp and weight decay are relative to the MLP output ‖m_0‖ (``norm_ref="mlp"``)."""
        return self.norm_ref == "mlp"


class StageIResult(NamedTuple):
    Z: Array  # (d, n_pad) targets z_i = h0_i + δ_i
    H0: Array  # (d, n_pad) block-L output at the bare prompt's subject-last token
    delta: Array  # (n_pad, d)
    ref_norm: Array  # (n_pad,) the clamp / weight-decay reference ‖h_0‖ or ‖m_0‖ (``norm_ref``)
    losses: Array  # (steps, n_pad) total loss per iteration (held after a request stops)
    nll: Array  # (steps, n_pad)
    steps_taken: Array  # (n_pad,) number of Adam updates applied


def safe_norm(x: Array, axis: int = -1) -> Array:
    """‖x‖ with a zero (sub)gradient at x = 0, like torch.norm's backward."""
    ss = jnp.sum(jnp.square(x), axis=axis)
    return jnp.where(ss > 0, jnp.sqrt(jnp.where(ss > 0, ss, 1.0)), 0.0)


def lower_hidden(cfg: ModelConfig, params: Any, batch: EditBatch, L: int) -> Array:
    """Hidden states entering block L for every row (computed once per batch)."""
    return forward(cfg, params, batch.tokens, batch.mask, stop_layer=L).last_hidden


def upper_logits(
    cfg: ModelConfig,
    params: Any,
    batch: EditBatch,
    h_in: Array,
    L: int,
    *,
    delta_rows: Array | None = None,
    w_out: WDeltas | None = None,
) -> tuple[Array, Array]:
    """Run blocks L..N-1 from ``h_in``; logits only where losses read them.

    Returns (target logits (R, Tt, V), logits at each row's subject-last token (R, V)).
    """
    add = AddAt(L, batch.lookup, delta_rows) if delta_rows is not None else None
    out = forward(
        cfg, params, None, batch.mask, h_start=h_in, start_layer=L, add_at=add, w_out_deltas=w_out,
        stop_layer=cfg.n_layers,
    )
    h = out.last_hidden
    logits_t = head(cfg, params, gather_positions(h, batch.tgt_pos))
    logits_k = head(cfg, params, gather_positions(h, batch.lookup[:, None]))[:, 0]
    return logits_t, logits_k


def row_terms(logits_t: Array, logits_k: Array, rows: EditBatch, logp_init: Array) -> tuple[Array, Array]:
    """Per-row (target NLL averaged over target tokens, KL(P_cur ‖ P_init) at the subject token).

    ``rows`` needs only the per-row fields (tgt_ids, tgt_mask); ``logp_init`` is (R, V).
    """
    logp = jax.nn.log_softmax(logits_t, axis=-1)
    tok = jnp.take_along_axis(logp, rows.tgt_ids[..., None], axis=-1)[..., 0]
    m = rows.tgt_mask.astype(logits_t.dtype)
    row_nll = -(tok * m).sum(-1) / jnp.maximum(m.sum(-1), 1.0)
    logp_k = jax.nn.log_softmax(logits_k, axis=-1)
    kl_rows = jnp.sum(jnp.exp(logp_k) * (logp_k - logp_init), axis=-1)
    return row_nll, kl_rows


def edit_and_loc_losses(
    logits_t: Array, logits_k: Array, batch: EditBatch, logp_init: Array
) -> tuple[Array, Array]:
    """Per-request (NLL of the new target, KL(P_cur ‖ P_init) on the KL prompt), both (n_pad,).

    NLL per rewriting prompt = sum over target tokens / #tokens; mean over the prompts (§3).
    """
    row_nll, kl_rows = row_terms(logits_t, logits_k, batch, logp_init)
    return batch.nll_avg @ row_nll, batch.kl_sel @ kl_rows


def rows_of(batch: EditBatch, per_request: Array) -> Array:
    """Broadcast a per-request array (n_pad, ...) to rows (R, ...)."""
    per = batch.tokens.shape[0] // batch.valid.shape[0]
    return jnp.repeat(per_request, per, axis=0)


class GroupWidths(NamedTuple):
    """Static widths of one row group with prefix reuse: full rows, cached prefix, stepped suffix."""

    full: int
    prefix: int
    suffix: int


def row_groups(
    batch: EditBatch, n_groups: int, prefix_reuse: bool = False
) -> tuple[np.ndarray, tuple[int, ...] | tuple[GroupWidths, ...]]:
    """Host-side split of the rows into ``n_groups`` length-sorted groups of static sizes.

    Returns (order (R,) row indices sorted by length, widths (n_groups,) bucketed to multiples
    of 4).  Group sizes follow ``np.array_split(R, n_groups)``, so they depend on R only.
    With ``prefix_reuse`` rows are sorted by suffix length (row length - subject-last index) and
    each group's widths are a ``GroupWidths`` (full row, prefix = subject-last index, suffix).
    """
    mask = to_host(batch.mask)
    R, T = mask.shape
    n_groups = min(int(n_groups), R)
    lens = mask.sum(axis=1)
    if not prefix_reuse:
        if n_groups == 1:
            return np.arange(R, dtype=np.int32), (T,)
        order = np.argsort(lens, kind="stable").astype(np.int32)
        widths = tuple(min(T, bucket(int(lens[g].max()), minimum=1, multiple=4))
                       for g in np.array_split(order, n_groups))
        return order, widths
    lookup = to_host(batch.lookup)
    suffix = lens - lookup
    order = (np.argsort(suffix, kind="stable") if n_groups > 1 else np.arange(R)).astype(np.int32)
    out = []
    for g in np.array_split(order, n_groups):
        out.append(GroupWidths(full=min(T, bucket(int(lens[g].max()), minimum=1, multiple=4)),
                               prefix=bucket(max(int(lookup[g].max()), 1), minimum=1, multiple=4),
                               suffix=min(T, bucket(int(suffix[g].max()), minimum=1, multiple=4))))
    return order, tuple(out)


def group_sizes(n_rows: int, n_groups: int) -> list[int]:
    """Rows per group (static): ``np.array_split`` sizes, as used by ``row_groups``."""
    return [len(a) for a in np.array_split(np.arange(n_rows), n_groups)]


def group_rows(batch: EditBatch, order: Array, widths: tuple) -> list[tuple[Array, EditBatch]]:
    """(row indices, per-row sub-batch cut to its width) for each group; per-request fields None."""
    sizes = group_sizes(batch.tokens.shape[0], len(widths))
    out, start = [], 0
    for size, w in zip(sizes, widths):
        w = w.full if isinstance(w, GroupWidths) else w
        idx = order[start:start + size]
        start += size
        out.append((idx, EditBatch(
            tokens=batch.tokens[idx, :w], mask=batch.mask[idx, :w], lookup=batch.lookup[idx],
            tgt_pos=batch.tgt_pos[idx], tgt_ids=batch.tgt_ids[idx], tgt_mask=batch.tgt_mask[idx],
            key_avg=None, nll_avg=None, kl_sel=None, bare_row=None, valid=None)))
    return out


def _block_L(cfg: ModelConfig, params: Any, rows: EditBatch, L: int, h_in: Array, ctx: Any,
             mlp_norm: bool) -> tuple[Array, Array, Array]:
    """Block L on the rows: (block output (B, T, d), h0 (B, d), norm reference rows (B, d)) — the
    reference is h0 itself, or with ``mlp_norm`` block L's MLP output m0 at the subject's last token."""
    if mlp_norm:
        h_L, _, _, m = block_parts_at(cfg, params, L, h_in, ctx)
    else:
        h_L, _ = block_at(cfg, params, L, h_in, ctx)
    h0 = f32(gather_positions(h_L, rows.lookup[:, None])[:, 0])
    ref = f32(gather_positions(m, rows.lookup[:, None])[:, 0]) if mlp_norm else h0
    return h_L, h0, ref


def _full_group(cfg: ModelConfig, params: Any, rows: EditBatch, L: int, mlp_norm: bool = False):
    """(h0 rows (B, d), norm reference rows (B, d), logits(delta_rows) -> (target logits,
    subject-token logits)) on full rows."""
    h_in = lower_hidden(cfg, params, rows, L)
    _, h0, ref = _block_L(cfg, params, rows, L, h_in, make_context(rows.mask), mlp_norm)
    return h0, ref, lambda delta_rows: upper_logits(cfg, params, rows, h_in, L, delta_rows=delta_rows)


def _prefix_group(cfg: ModelConfig, params: Any, rows: EditBatch, L: int, w: GroupWidths, mlp_norm: bool = False):
    """As ``_full_group`` with prefix reuse: blocks ≤ L and the upper blocks' prefix keys/values
    once (δ = 0), each call runs blocks L+1.. over the rows' suffixes only (module docstring)."""
    ctx = make_context(rows.mask)
    h_in = lower_hidden(cfg, params, rows, L)
    h_L, h0, ref = _block_L(cfg, params, rows, L, h_in, ctx, mlp_norm)
    _, (k, v) = run_layers_kv(cfg, params, h_L, ctx, L + 1, cfg.n_layers)  # (n_up, B, W, Hkv, hd)
    P = min(w.prefix, w.full)
    prefix = KVPrefix(k=k[:, :, :P], v=v[:, :, :P],
                      allowed=jnp.arange(P)[None, :] < rows.lookup[:, None])
    idx, in_range = suffix_positions(rows.lookup, w.suffix, w.full)
    s_mask = gather_positions(ctx.mask, idx) & in_range
    s_pos = gather_positions(ctx.positions, idx)
    x0 = gather_positions(h_L, idx)  # (B, S, d): block-L output on the suffix (δ = 0)
    t_pos = jnp.clip(rows.tgt_pos - rows.lookup[:, None], 0, w.suffix - 1)

    def logits(delta_rows: Array) -> tuple[Array, Array]:
        x = x0.at[:, 0].add(delta_rows.astype(x0.dtype))  # δ at the subject's last token = suffix start
        h = run_layers_after_prefix(cfg, params, x, s_pos, s_mask, prefix, L + 1, cfg.n_layers)
        return head(cfg, params, gather_positions(h, t_pos)), head(cfg, params, h[:, 0])

    return h0, ref, logits


class LoopState(NamedTuple):
    """Stage I loop carry for ``n_pad`` requests (what compaction moves between phases)."""

    it: Array  # () steps run so far
    delta: Array  # (n_pad, d)
    opt_state: Any  # optax Adam state: shared count, per-request moments (n_pad, d)
    active: Array  # (n_pad,) bool: still optimizing
    taken: Array  # (n_pad,) int32 Adam updates applied
    losses: Array  # (steps, n_pad) NaN where not (yet) computed
    nlls: Array  # (steps, n_pad)


def _stage1_loop(
    cfg: ModelConfig, params: Any, batch: EditBatch, order: Array, L: int, hp: StageIConfig,
    widths: tuple[int, ...] | tuple[GroupWidths, ...], state: LoopState | None, min_active: int,
) -> tuple[LoopState, Array]:
    """Run Stage I steps from ``state`` (None: fresh) until step ``hp.steps``, no request is active,
    or at most ``min_active`` are.  Returns (state, h0 (n_pad, d), norm reference ‖h0‖ or ‖m0‖ (n_pad,))."""
    n_pad = batch.valid.shape[0]
    per = batch.tokens.shape[0] // n_pad
    groups = group_rows(batch, order, widths)
    req_of = [idx // per for idx, _ in groups]
    nll_avg = batch.nll_avg[:, order]
    kl_sel = batch.kl_sel[:, order]
    fns, h0_rows, ref_rows, logp_init = [], [], [], []
    for (idx, rows), w in zip(groups, widths):
        if isinstance(w, GroupWidths):
            h0_g, ref_g, fn = _prefix_group(cfg, params, rows, L, w, hp.mlp_norm)
        else:
            h0_g, ref_g, fn = _full_group(cfg, params, rows, L, hp.mlp_norm)
        _, logits_k0 = fn(jnp.zeros((idx.shape[0], cfg.d_model), h0_g.dtype))
        logp_init.append(jax.lax.stop_gradient(jax.nn.log_softmax(logits_k0, axis=-1)))
        h0_rows.append(h0_g)
        ref_rows.append(ref_g)
        fns.append(fn)
    inv = jnp.argsort(order)
    h0 = jnp.concatenate(h0_rows)[inv[batch.bare_row]]  # (n_pad, d)
    # ‖h_0‖ (MEMIT) or ‖m_0‖ (ROME): the clamp and weight-decay reference of each request (norm_ref)
    h0_norm = safe_norm(jnp.concatenate(ref_rows)[inv[batch.bare_row]])

    def loss_fn(delta: Array) -> tuple[Array, tuple[Array, Array]]:
        row_nll, kl_rows = [], []
        for (_, rows), fn, lp0, req in zip(groups, fns, logp_init, req_of):
            logits_t, logits_k = fn(delta[req])
            a, b = row_terms(logits_t, logits_k, rows, lp0)
            row_nll.append(a)
            kl_rows.append(b)
        nll = nll_avg @ jnp.concatenate(row_nll)
        kl = kl_sel @ jnp.concatenate(kl_rows)
        wd = hp.weight_decay * safe_norm(delta) / jnp.square(h0_norm)
        total = nll + hp.kl_factor * kl + wd
        return jnp.sum(total * batch.valid), (total, nll)

    opt = optax.adam(hp.lr)
    max_norm = hp.clamp_norm_factor * h0_norm

    def cond(s: LoopState):
        return (s.it < hp.steps) & (jnp.sum(s.active) > min_active)

    def body(s: LoopState) -> LoopState:
        it, delta, opt_state, active, taken, losses, nlls = s
        (_, (total, nll)), g = jax.value_and_grad(loss_fn, has_aux=True)(delta)
        losses = losses.at[it].set(jnp.where(active, total, losses[it]))
        nlls = nlls.at[it].set(jnp.where(active, nll, nlls[it]))
        active = active & (total >= hp.early_stop) & (it < hp.steps - 1)
        upd, opt_state = opt.update(g, opt_state, delta)
        new = delta + upd
        nn = safe_norm(new)
        scale = jnp.where(nn > max_norm, max_norm / jnp.where(nn > 0, nn, 1.0), 1.0)
        new = new * scale[:, None]
        delta = jnp.where(active[:, None], new, delta)
        return LoopState(it + 1, delta, opt_state, active, taken + active.astype(jnp.int32), losses, nlls)

    # The loop ends as soon as every request has stopped (reference: per-request early stop at
    # 5e-2, at most steps-1 Adam updates); a stopped request's loss curve holds its last value.
    if state is None:
        delta0 = jnp.zeros((n_pad, cfg.d_model), h0.dtype)
        nan = jnp.full((hp.steps, n_pad), jnp.nan, h0.dtype)
        state = LoopState(jnp.asarray(0), delta0, opt.init(delta0), batch.valid > 0,
                          jnp.zeros((n_pad,), jnp.int32), nan, nan)
    return jax.lax.while_loop(cond, body, state), h0, h0_norm


def _fill_forward(x: Array) -> Array:
    """Along axis 0, replace NaN by the last non-NaN value (a stopped request's loss is held)."""
    return jax.lax.associative_scan(lambda a, b: jnp.where(jnp.isnan(b), a, b), x, axis=0)


def _result(cfg: ModelConfig, s: LoopState, h0: Array, ref_norm: Array, valid: Array) -> StageIResult:
    Z = (h0 + s.delta).T * valid
    chex.assert_shape(Z, (cfg.d_model, valid.shape[0]))
    return StageIResult(Z=Z, H0=h0.T * valid, delta=s.delta, ref_norm=ref_norm * valid, losses=_fill_forward(s.losses),
                        nll=_fill_forward(s.nlls), steps_taken=s.taken)


@partial(jax.jit, static_argnames=("cfg", "L", "hp", "widths"))
def optimize_targets_grouped(
    cfg: ModelConfig, params: Any, batch: EditBatch, order: Array, L: int, hp: StageIConfig,
    widths: tuple[int, ...] | tuple[GroupWidths, ...],
) -> StageIResult:
    """Stage I for every request of ``batch`` in one jitted computation (docs/FORMULAS.md §3).

    ``order`` / ``widths`` come from ``row_groups``; rows are run group by group and their loss
    terms are mapped back to requests through the permuted ``nll_avg`` / ``kl_sel``.  ``GroupWidths``
    widths select prefix reuse (module docstring); plain int widths run the full rows every step.
    """
    s, h0, ref_norm = _stage1_loop(cfg, params, batch, order, L, hp, widths, None, 0)
    return _result(cfg, s, h0, ref_norm, batch.valid)


@partial(jax.jit, static_argnames=("cfg", "L", "hp", "widths", "min_active"))
def stage1_phase(
    cfg: ModelConfig, params: Any, batch: EditBatch, order: Array, L: int, hp: StageIConfig,
    widths: tuple[int, ...] | tuple[GroupWidths, ...], state: LoopState | None, min_active: int,
) -> tuple[LoopState, Array, Array]:
    """One compaction phase (module docstring): steps until at most ``min_active`` requests are
    active (or none / ``hp.steps``).  Returns (loop state, h0 (n_pad, d), norm reference (n_pad,))."""
    return _stage1_loop(cfg, params, batch, order, L, hp, widths, state, min_active)


def _smaller_bucket(n_pad: int) -> int:
    """The largest request bucket below ``n_pad`` (0 for 1): a phase ends when the active fit it."""
    below = [m for m in range(n_pad - 1, 0, -1) if bucket_requests(m) == m]
    return below[0] if below else 0


def _placed(x: Any, mesh: Any) -> Array:
    """A host value as a device array: ``jnp.asarray`` without a mesh, else replicated on ``mesh``
    (a global array, so that every process of a multi-process run feeds the same jitted step)."""
    return jnp.asarray(x) if mesh is None else replicate(np.asarray(x), mesh)


def _take_state(s: LoopState, sel: np.ndarray, valid: np.ndarray, mesh: Any = None) -> LoopState:
    """The loop state of requests ``sel`` (padding copies made inactive)."""
    idx = _placed(sel, mesh)
    n_old = s.delta.shape[0]
    rows = lambda x: x[idx] if x.ndim >= 1 and x.shape[0] == n_old else x  # noqa: E731
    return LoopState(it=s.it, delta=s.delta[idx], opt_state=jax.tree.map(rows, s.opt_state),
                     active=s.active[idx] & _placed(valid > 0, mesh), taken=s.taken[idx],
                     losses=s.losses[:, idx], nlls=s.nlls[:, idx])


def _mesh(*trees: Any) -> Any:
    for t in trees:
        m = mesh_of(t)
        if m is not None:
            return m
    return None


def optimize_targets_compacted(
    cfg: ModelConfig, params: Any, batch: EditBatch, L: int, hp: StageIConfig
) -> StageIResult:
    """Stage I with converged requests dropped between phases (module docstring, "Compaction").

    Each phase is one jitted loop; between phases the host reads the active flags (a few
    transfers per batch) and gathers the active requests and their loop state.  On a mesh the
    host reads are ``sharding.to_host`` (gathered from every process in a multi-process run) and
    the sub-batches are placed replicated on it.
    """
    mesh = _mesh(batch, params)
    host = EditBatch(*[to_host(x) for x in batch])
    n_pad = host.valid.shape[0]
    ids = np.arange(n_pad)  # original index of each request of the current sub-batch
    sub, state, h0_all, ref_all = batch, None, None, None
    d = cfg.d_model
    delta_all = np.zeros((n_pad, d), np.float32)
    losses_all = np.full((hp.steps, n_pad), np.nan, np.float32)
    nlls_all = losses_all.copy()
    taken_all = np.zeros((n_pad,), np.int32)
    sub_host = host
    while True:
        order, widths = row_groups(sub_host, hp.row_groups, hp.prefix_reuse)
        cur = sub_host.valid.shape[0]
        state, h0, ref_norm = stage1_phase(cfg, params, sub, _placed(order, mesh), L, hp, widths, state,
                                           _smaller_bucket(cur))
        if h0_all is None:  # the first phase holds every request
            h0_all, ref_all = h0, ref_norm
            delta_all = delta_all.astype(np.dtype(h0.dtype))
            losses_all, nlls_all = losses_all.astype(delta_all.dtype), nlls_all.astype(delta_all.dtype)
        real = sub_host.valid > 0
        delta_all[ids[real]] = to_host(state.delta)[real]
        losses_all[:, ids[real]] = to_host(state.losses)[:, real]
        nlls_all[:, ids[real]] = to_host(state.nlls)[:, real]
        taken_all[ids[real]] = to_host(state.taken)[real]
        active = to_host(state.active)
        if int(to_host(state.it)) >= hp.steps or not active.any():
            break
        keep = np.nonzero(active)[0]
        m = bucket_requests(len(keep))
        sel = np.concatenate([keep, np.full(m - len(keep), keep[-1])])
        valid = (np.arange(m) < len(keep)).astype(np.float32)
        sub_host = take_requests(sub_host, sel, valid)
        sub = EditBatch(*[_placed(x, mesh) for x in sub_host])
        state = _take_state(state, sel, valid, mesh)
        ids = ids[sel]
    s = LoopState(it=state.it, delta=_placed(delta_all, mesh), opt_state=None, active=None,
                  taken=_placed(taken_all, mesh), losses=_placed(losses_all, mesh), nlls=_placed(nlls_all, mesh))
    return _result(cfg, s, h0_all, ref_all, batch.valid)


def optimize_targets(
    cfg: ModelConfig, params: Any, batch: EditBatch, L: int, hp: StageIConfig
) -> StageIResult:
    """Stage I (docs/FORMULAS.md §3): split the rows into ``hp.row_groups`` groups, run the jitted
    loop; with ``hp.compact``, in phases that drop converged requests (``optimize_targets_compacted``)."""
    if hp.compact and batch.valid.shape[0] > 1:
        return optimize_targets_compacted(cfg, params, batch, L, hp)
    order, widths = row_groups(batch, hp.row_groups, hp.prefix_reuse)
    return optimize_targets_grouped(cfg, params, batch, _placed(order, _mesh(batch, params)), L, hp, widths)


# ----------------------------------------------------------------------------- PMET: attention + FFN targets


class AttnFFNResult(NamedTuple):
    """PMET's Stage I (docs/FORMULAS.md §4 "PMET"): the FFN-output target is the one written."""

    Z: Array  # (d, n_pad) z_mlp = m0 + δ_mlp (FFN output space)
    H0: Array  # (d, n_pad) m0: FFN output of block L at the bare prompt's subject-last token
    delta: Array  # (n_pad, d) δ_mlp
    Z_attn: Array  # (d, n_pad) z_attn = a0 + δ_attn (reported, not written)
    delta_attn: Array  # (n_pad, d)
    losses: Array  # (steps, n_pad)
    nll: Array  # (steps, n_pad) unweighted NLL
    steps_taken: Array  # (n_pad,)


def attn_ffn_terms(cfg: ModelConfig, params: Any, batch: EditBatch, L: int, h_in: Array, d_attn: Array,
                   d_mlp: Array, logp_init: Array) -> tuple[Array, Array, Array]:
    """Per request (n_pad,): (NLL of the new target, KL(P_cur ‖ P_init) on the KL prompt, whether the new
    target is the argmax at every target position of every rewriting prompt), with ``d_attn`` / ``d_mlp``
    (n_pad, d) added to block L's attention / FFN outputs at each row's subject-last token.

    ``h_in`` (R, T, d): hidden states entering block L (``lower_hidden``); ``logp_init`` (R, V)."""
    ctx = make_context(batch.mask)
    onehot = jax.nn.one_hot(batch.lookup, batch.mask.shape[1], dtype=h_in.dtype)[:, :, None]  # (R, T, 1)
    h, _, _, _ = block_parts_at(cfg, params, L, h_in, ctx, attn_add=onehot * rows_of(batch, d_attn)[:, None, :],
                                mlp_add=onehot * rows_of(batch, d_mlp)[:, None, :])
    h = forward(cfg, params, None, batch.mask, h_start=h, start_layer=L + 1, stop_layer=cfg.n_layers).last_hidden
    logits_t = head(cfg, params, gather_positions(h, batch.tgt_pos))
    logits_k = head(cfg, params, gather_positions(h, batch.lookup[:, None]))[:, 0]
    row_nll, kl_rows = row_terms(logits_t, logits_k, batch, logp_init)
    hit = (jnp.argmax(logits_t, axis=-1) == batch.tgt_ids) | (batch.tgt_mask == 0)
    row_miss = 1.0 - jnp.all(hit, axis=-1).astype(jnp.float32)
    argmax_ok = ((batch.nll_avg > 0).astype(jnp.float32) @ row_miss) == 0
    return batch.nll_avg @ row_nll, batch.kl_sel @ kl_rows, argmax_ok


@partial(jax.jit, static_argnames=("cfg", "L", "hp", "nll_loss_factor"))
def optimize_attn_ffn_targets(cfg: ModelConfig, params: Any, batch: EditBatch, L: int, hp: StageIConfig,
                              nll_loss_factor: float = 1.0) -> AttnFFNResult:
    """PMET's Stage I for every request of ``batch`` in one jitted loop (docs/FORMULAS.md §4 "PMET";
    BASELINES.md §4, xpq-tech/BLUE ``pmet/compute_zs.py``).

    Two vectors per request, δ_attn and δ_mlp (d,), added to block L's attention output and FFN output at
    the subject's last token of every row, optimised jointly by one Adam (lr ``hp.lr``) on
    ``f·NLL + kl_factor·KL + wd·(‖δ_mlp‖/‖m0‖² + ‖δ_attn‖/‖a0‖²)`` (m0, a0: the unshifted FFN and attention
    outputs at the bare prompt).  f starts at ``nll_loss_factor``; after a step at which the new target is
    the argmax at every target position it is 0.1·``nll_loss_factor`` for the next step (else reset), and
    the request stops when in addition KL < 0.01; it also stops at loss < ``hp.early_stop`` or after
    ``hp.steps − 1`` updates.  Each δ is clamped to ``hp.clamp_norm_factor`` × the norm of its own m0 / a0.
    One padded row width (no row groups).  Returns ``AttnFFNResult`` with Z = m0 + δ_mlp (d, n_pad).
    """
    n_pad = batch.valid.shape[0]
    valid = batch.valid > 0
    h_in = lower_hidden(cfg, params, batch, L)
    _, _, a_rows, m_rows = block_parts_at(cfg, params, L, h_in, make_context(batch.mask))
    a0 = f32(gather_positions(a_rows, batch.lookup[:, None])[:, 0])[batch.bare_row]  # (n_pad, d)
    m0 = f32(gather_positions(m_rows, batch.lookup[:, None])[:, 0])[batch.bare_row]
    a0_norm, m0_norm = safe_norm(a0), safe_norm(m0)
    pad = 1.0 - valid.astype(a0.dtype)  # padded requests: no division by a zero norm
    zeros = jnp.zeros((n_pad, cfg.d_model), a0.dtype)
    _, logits_k0 = upper_logits(cfg, params, batch, h_in, L)
    logp_init = jax.lax.stop_gradient(jax.nn.log_softmax(logits_k0, axis=-1))

    def loss_fn(ds, factor):
        d_attn, d_mlp = ds
        nll, kl, ok = attn_ffn_terms(cfg, params, batch, L, h_in, d_attn, d_mlp, logp_init)
        wd = hp.weight_decay * (safe_norm(d_mlp) / (jnp.square(m0_norm) + pad)
                                + safe_norm(d_attn) / (jnp.square(a0_norm) + pad))
        total = jnp.where(valid, factor * nll + hp.kl_factor * kl + wd, 0.0)
        return jnp.sum(total), (total, nll, kl, ok)

    opt = optax.adam(hp.lr)
    max_a, max_m = hp.clamp_norm_factor * a0_norm, hp.clamp_norm_factor * m0_norm

    def clamp(x, mx):
        nx = safe_norm(x)
        return x * jnp.where(nx > mx, mx / jnp.where(nx > 0, nx, 1.0), 1.0)[:, None]

    def cond(carry):
        return (carry[0] < hp.steps) & jnp.any(carry[4])

    def body(carry):
        it, ds, opt_state, factor, active, taken, losses, nlls = carry
        (_, (total, nll, kl, ok)), g = jax.value_and_grad(loss_fn, has_aux=True)(ds, factor)
        losses = losses.at[it].set(jnp.where(active, total, losses[it]))
        nlls = nlls.at[it].set(jnp.where(active, nll, nlls[it]))
        stop = (total < hp.early_stop) | (ok & (kl < 0.01)) | (it >= hp.steps - 1)
        active = active & ~stop
        upd, opt_state = opt.update(g, opt_state, ds)
        new = (clamp(ds[0] + upd[0], max_a), clamp(ds[1] + upd[1], max_m))
        ds = tuple(jnp.where(active[:, None], n, o) for n, o in zip(new, ds))
        factor = jnp.where(ok, 0.1 * nll_loss_factor, nll_loss_factor).astype(factor.dtype)
        return it + 1, ds, opt_state, factor, active, taken + active.astype(jnp.int32), losses, nlls

    nan = jnp.full((hp.steps, n_pad), jnp.nan, a0.dtype)
    ds0 = (zeros, zeros)
    init = (jnp.asarray(0), ds0, opt.init(ds0), jnp.full((n_pad,), nll_loss_factor, a0.dtype), valid,
            jnp.zeros((n_pad,), jnp.int32), nan, nan)
    _, (d_attn, d_mlp), _, _, _, taken, losses, nlls = jax.lax.while_loop(cond, body, init)
    fill_forward = lambda x: jax.lax.associative_scan(  # noqa: E731
        lambda a, b: jnp.where(jnp.isnan(b), a, b), x, axis=0)
    v = batch.valid
    return AttnFFNResult(Z=(m0 + d_mlp).T * v, H0=m0.T * v, delta=d_mlp, Z_attn=(a0 + d_attn).T * v,
                         delta_attn=d_attn, losses=fill_forward(losses), nll=fill_forward(nlls), steps_taken=taken)
