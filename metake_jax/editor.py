"""One edit batch, end to end, and the sequential edit state (docs/FORMULAS.md §3–§6, §9).

``edit_batch``: tokenize → Stage I targets (one jitted computation for the batch) → optional
MetaKE refinement (one jitted scan) → multi-layer write (one jitted scan) → all-or-nothing
application → C_p update with the batch's keys recomputed on the edited model.
The state ``(params, LayerStats, n_edits)`` is a pytree carried from batch to batch.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metake_jax.batch import EditBatch, prepare_batch, rows_per_request, select_rows
from metake_jax.editors import Editor, LayerStats, NotGatedError
from metake_jax.editors.alphaedit import AlphaEdit
from metake_jax.errors import EditError
from metake_jax.metake import LookRows, MetaKEConfig, group_look_rows, pack_look_rows, refine_targets
from metake_jax.sharding import mesh_of, replicate, shard_rows, to_host
from metake_jax.targets import StageIConfig, optimize_attn_ffn_targets, optimize_targets
from metake_jax.tokens import ChatFormat
from metake_jax.keys import keys_and_hidden
from metake_jax.write import (apply_deltas, association_beta, check_write, multilayer_write, realized_gamma,
                              updated_key_cache)
from models.config import ModelConfig
from models.interface import w_out, with_w_out

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class EditConfig:
    """What to do with a batch: edited layers, Stage I, downstream editor, optional MetaKE.

    ``stage1.norm_ref="auto"`` is resolved here to the editor's ``stage1_norm_ref`` (ROME: "mlp").
    Raises ValueError for layers that are not a non-empty increasing tuple, and ``NotGatedError`` when
    MetaKE is asked over an editor whose update is not Δ = R·B(K)."""

    layers: tuple[int, ...]
    stage1: StageIConfig = StageIConfig()
    editor: Editor = AlphaEdit()
    metake: MetaKEConfig | None = None
    measure: bool = False  # per-request association β and realized γ in the BatchReport (§5, §10 Fig. 4)

    def __post_init__(self) -> None:
        if not self.layers or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"edited layers must be a non-empty increasing tuple, got {self.layers}")
        if self.metake is not None and self.metake.steps > 0 and not self.editor.is_gated():
            raise NotGatedError(f"MetaKE needs a gated editor (Δ = R·B(K)); {self.editor.name!r} is not")
        if self.stage1.norm_ref == "auto":
            object.__setattr__(self, "stage1", dataclasses.replace(self.stage1, norm_ref=self.editor.stage1_norm_ref))


class EditState(NamedTuple):
    params: Any
    stats: LayerStats
    n_edits: int


def init_state(params: Any, cfg: ModelConfig, layers: Sequence[int], *, P: Array | None = None,
               C0: Array | None = None) -> EditState:
    """Fresh state: C_p = 0 for every edited layer."""
    m = len(layers)
    for name, x in (("P", P), ("C0", C0)):
        if x is not None and tuple(x.shape) != (m, cfg.d_ff, cfg.d_ff):
            raise ValueError(f"{name} must have shape {(m, cfg.d_ff, cfg.d_ff)}, got {tuple(x.shape)}")
    Cp = jnp.zeros((m, cfg.d_ff, cfg.d_ff), jnp.float32)
    return EditState(params=params, stats=LayerStats(P=P, C0=C0, Cp=Cp), n_edits=0)


@dataclasses.dataclass
class BatchReport:
    case_ids: list[Any]
    stage1_losses: np.ndarray  # (steps, n)
    stage1_steps: np.ndarray  # (n,)
    meta_losses: np.ndarray | None  # (T+1, n)
    residual_norm: np.ndarray  # (m, n)
    timings: dict[str, float]
    beta: np.ndarray | None = None  # (n,) association at the final edited layer before the write (measure)
    gamma: np.ndarray | None = None  # (n,) realized coefficient of the written targets (measure)
    planned_norm: np.ndarray | None = None  # (n,) ‖z_i − h_L,i‖ before the write (measure)

    def summary(self) -> dict[str, Any]:
        out = {
            "n": len(self.case_ids),
            "stage1_final_loss_mean": float(self.stage1_losses[-1].mean()),
            "stage1_steps_mean": float(self.stage1_steps.mean()),
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }
        if self.meta_losses is not None:
            out["meta_loss_first_mean"] = float(self.meta_losses[0].mean())
            out["meta_loss_last_mean"] = float(self.meta_losses[-1].mean())
        for k in ("beta", "gamma", "planned_norm"):
            v = getattr(self, k)
            if v is not None:  # per request, in case order (float('nan') where undefined)
                out[k] = [float(x) for x in np.asarray(v, np.float64)]
        return out


_write = jax.jit(multilayer_write, static_argnames=("cfg", "layers", "editor"))
_keys_and_hidden = jax.jit(keys_and_hidden, static_argnames=("cfg", "layers"))


def _timed(timings: dict[str, float], key: str, fn, *args, **kw):
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kw))
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - t
    return out


def look_rows(batch: EditBatch, mcfg: MetaKEConfig, pack: bool = True) -> LookRows:
    """Rows scoring the virtual model — every row (``prompts="all"``) or the bare + KL rows of each
    request (``"bare"``) — packed side by side into rows of ``metake.PACK_WIDTH`` tokens
    (``metake.pack_look_rows``; the real requests' rows only), or with ``pack=False`` / ``feedback="ungated"``
    in length-sorted groups each cut to its own width (``metake.group_look_rows``).  No number changes."""
    if mcfg.prompts != "all":
        per = rows_per_request(batch)
        batch = select_rows(batch, (int(np.asarray(batch.bare_row)[0]), per - 1))  # the KL row is last in each block
    if pack and mcfg.feedback != "ungated":
        return pack_look_rows(batch)
    return group_look_rows(batch, LOOK_GROUPS_ALL if mcfg.prompts == "all" else LOOK_GROUPS_BARE)


LOOK_GROUPS_ALL, LOOK_GROUPS_BARE = 4, 2  # look-row groups: as Stage I's default row groups; bare / KL rows


def compute_targets(
    cfg: ModelConfig, state: EditState, batch: EditBatch, ecfg: EditConfig, timings: dict[str, float],
    look_batch: EditBatch | LookRows | None = None,
) -> tuple[Array, Any, Any]:
    """Stage I and (if configured) the MetaKE refinement. Returns (Z, stage1 result, refine result)."""
    L = ecfg.layers[-1]
    if ecfg.editor.targets == "attn_ffn":  # PMET: δ_attn + δ_mlp, Z in FFN-output space
        s1 = _timed(timings, "stage1", optimize_attn_ffn_targets, cfg, state.params, batch, L, ecfg.stage1,
                    float(getattr(ecfg.editor, "nll_loss_factor", 1.0)))
        return s1.Z, s1, None
    s1 = _timed(timings, "stage1", optimize_targets, cfg, state.params, batch, L, ecfg.stage1)
    Z, ref = s1.Z, None
    if ecfg.metake is not None and ecfg.metake.steps > 0:
        with ecfg.editor.scope():
            ref = _timed(timings, "lookahead", refine_targets, cfg, state.params, batch, s1.Z,
                         ecfg.layers, state.stats, ecfg.editor, ecfg.metake, look_batch)
        Z = ref.Z
    return Z, s1, ref


def write_targets(
    cfg: ModelConfig, state: EditState, batch: EditBatch, Z: Array, ecfg: EditConfig,
    timings: dict[str, float],
) -> tuple[EditState, Any]:
    """Multi-layer write of Z, all-or-nothing, then the C_p update (docs/FORMULAS.md §4).

    Raises ``EditError`` (``IllConditionedError`` for an unreliable solve), naming the layer, and
    leaves ``state`` as it was: a batch is written whole or not at all."""
    new_params, aux = _write_layers(cfg, state.params, batch, Z, ecfg.layers, state.stats, ecfg.editor, timings)
    return _update_cache(cfg, state, new_params, batch, ecfg.layers, timings), aux


def _write_layers(cfg: ModelConfig, params: Any, batch: EditBatch, Z: Array, layers: tuple[int, ...],
                  stats: LayerStats, editor: Editor, timings: dict[str, float]) -> tuple[Any, Any]:
    """The editor's write of Z into ``layers`` (checked, all or nothing): (new params, WriteAux)."""
    with editor.scope():
        deltas, aux = _timed(timings, "write", _write, cfg, params, batch, Z, layers, stats, editor)
    check_write(aux, layers)
    return apply_deltas(params, layers, deltas), aux  # raises EditError, params untouched


def _update_cache(cfg: ModelConfig, state: EditState, new_params: Any, batch: EditBatch,
                  layers: tuple[int, ...], timings: dict[str, float]) -> EditState:
    """C_p += Σ K Kᵀ with the batch's keys on the edited model (docs/FORMULAS.md §4); the new state."""
    Cp, finite = _timed(timings, "cache", updated_key_cache, cfg, new_params, batch, layers, state.stats.Cp)
    if not bool(to_host(finite)):
        raise EditError("non-finite keys after the edit: batch not written")
    n = int(to_host(batch.valid).sum())
    return EditState(params=new_params, stats=state.stats._replace(Cp=Cp), n_edits=state.n_edits + n)


def _slot_stats(stats: LayerStats, j: int) -> LayerStats:
    """The statistics of edited-layer slot j alone (leading axis of size 1)."""
    pick = (lambda x: None if x is None else x[j:j + 1])  # noqa: E731
    return LayerStats(P=pick(stats.P), C0=pick(stats.C0), Cp=stats.Cp[j:j + 1])


def edit_per_layer(cfg: ModelConfig, state: EditState, batch: EditBatch, ecfg: EditConfig,
                   timings: dict[str, float]) -> tuple[EditState, Any, Any]:
    """Per-layer targets (``Editor.per_layer_targets``, AlphaEdit-BLUE; BASELINES.md §5): for each edited
    layer l in order, Stage I at layer l on the model as edited so far in this batch, then the editor's
    one-layer write of those targets (R_l = Z_l − H_l, undivided); then the C_p update of every layer
    with the keys recomputed on the edited model.  Returns (new state, last Stage I result, last WriteAux).
    Raises EditError as ``write_targets``; ``state`` is unchanged then."""
    params, s1, aux = state.params, None, None
    for j, layer in enumerate(ecfg.layers):
        s1 = _timed(timings, "stage1", optimize_targets, cfg, params, batch, layer, ecfg.stage1)
        params, aux = _write_layers(cfg, params, batch, s1.Z, (layer,), _slot_stats(state.stats, j),
                                    ecfg.editor, timings)
    return _update_cache(cfg, state, params, batch, ecfg.layers, timings), s1, aux


def edit_batch(
    cfg: ModelConfig,
    state: EditState,
    tokenizer: Any,
    requests: Sequence[Any],
    templates: Sequence[Sequence[str]],
    ecfg: EditConfig,
    *,
    n_pad: int | None = None,
    chat: ChatFormat | None = None,
) -> tuple[EditState, BatchReport]:
    """Edit one batch of requests on top of ``state``; returns the new state and a report.

    ``chat``: a ``tokens.ChatFormat`` (rewriting prompts wrapped in the chat template).  Raises
    ``RequestError`` (bad request, row longer than ``cfg.max_positions``) before any compute and
    ``EditError`` when the write is refused; either way ``state`` is unchanged.

    An editor with ``one_at_a_time`` (ROME) writes the requests one by one, each on the model edited
    by the ones before it (its reference's semantics); the batch is still all or nothing."""
    for need in sorted(ecfg.editor.needs):
        if getattr(state.stats, need) is None:
            raise EditError(f"editor {ecfg.editor.name!r} needs layer statistics {need}: compute them first")
    if ecfg.editor.one_at_a_time and len(requests) > 1:
        return _edit_one_at_a_time(cfg, state, tokenizer, requests, templates, ecfg, chat)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    host_batch, n = prepare_batch(tokenizer, requests, templates, n_pad=n_pad, chat=chat,
                                  max_positions=cfg.max_positions)
    mesh = mesh_of(state.params)
    batch = shard_rows(EditBatch(*host_batch), mesh)  # rows over the mesh's "data" axis
    lb = look_rows(host_batch, ecfg.metake) if ecfg.metake is not None else None
    if lb is not None and mesh is not None:  # global arrays: every process feeds the same jitted steps
        lb = jax.tree.map(lambda x: replicate(x, mesh), lb)
    timings["prepare"] = time.perf_counter() - t0
    measured: dict[str, np.ndarray | None] = {}  # EditConfig.measure (not for per-layer-target editors)
    if ecfg.editor.per_layer_targets:
        new_state, s1, aux = edit_per_layer(cfg, state, batch, ecfg, timings)
        ref = None
    else:
        Z, s1, ref = compute_targets(cfg, state, batch, ecfg, timings, lb)
        before = measure_before(cfg, state, batch, ecfg, timings) if ecfg.measure else None
        new_state, aux = write_targets(cfg, state, batch, Z, ecfg, timings)
        measured = measure_after(cfg, new_state, batch, ecfg, Z, before, n, timings) if ecfg.measure else {}
    timings["total"] = time.perf_counter() - t0
    report = BatchReport(
        case_ids=[getattr(r, "case_id", None) for r in requests],
        stage1_losses=to_host(s1.losses)[:, :n], stage1_steps=to_host(s1.steps_taken)[:n],
        meta_losses=None if ref is None else to_host(ref.losses)[:, :n],
        residual_norm=to_host(aux.residual_norm)[:, :n], timings=timings, **measured,
    )
    return new_state, report


def measure_before(cfg: ModelConfig, state: EditState, batch: EditBatch, ecfg: EditConfig,
                    timings: dict[str, float]) -> tuple[Array, Array, np.ndarray | None]:
    """``EditConfig.measure``, before the write: (K_L (d_k, n_pad), H_L (d, n_pad), β (n_pad,) or None for an
    editor without an association statistic) on the unedited-by-this-batch model (docs/FORMULAS.md §5, §10)."""
    t = time.perf_counter()
    K, H = _keys_and_hidden(cfg, state.params, batch, tuple(ecfg.layers))
    try:
        beta = association_beta(to_host(K[-1]), state.stats, ecfg.editor)
    except NotImplementedError:
        beta = None
    timings["measure"] = timings.get("measure", 0.0) + time.perf_counter() - t
    return K, H, beta


def measure_after(cfg: ModelConfig, new_state: EditState, batch: EditBatch, ecfg: EditConfig, Z: Array,
                   before: tuple[Array, Array, np.ndarray | None], n: int,
                   timings: dict[str, float]) -> dict[str, np.ndarray | None]:
    """``EditConfig.measure``, after the full multi-layer write: realized γ_i = ⟨r̂_i, r_i⟩/‖r_i‖² with
    r = Z − h_L, r̂ = h_L^post − h_L (docs/FORMULAS.md §5 C.6, §10 Fig. 4); real requests only."""
    t = time.perf_counter()
    _, H, beta = before
    _, H_post = _keys_and_hidden(cfg, new_state.params, batch, tuple(ecfg.layers))
    R = Z - H
    gamma = to_host(realized_gamma(R, H_post - H))[:n].astype(np.float64)
    norm = to_host(jnp.linalg.norm(R, axis=0))[:n].astype(np.float64)
    timings["measure"] = timings.get("measure", 0.0) + time.perf_counter() - t
    return {"beta": None if beta is None else np.asarray(beta, np.float64)[:n], "gamma": gamma, "planned_norm": norm}


def _edit_one_at_a_time(cfg: ModelConfig, state: EditState, tokenizer: Any, requests: Sequence[Any],
                        templates: Sequence[Sequence[str]], ecfg: EditConfig,
                        chat: ChatFormat | None) -> tuple[EditState, BatchReport]:
    """``edit_batch`` of each request in turn (n_pad = 1, one compiled shape); reports concatenated."""
    reports = []
    for r in requests:
        state, rep = edit_batch(cfg, state, tokenizer, [r], templates, ecfg, n_pad=1, chat=chat)
        reports.append(rep)
    cat = lambda xs, axis=-1: np.concatenate(xs, axis=axis)  # noqa: E731
    timings: dict[str, float] = {}
    for rep in reports:
        for k, v in rep.timings.items():
            timings[k] = timings.get(k, 0.0) + v
    return state, BatchReport(
        case_ids=[c for rep in reports for c in rep.case_ids],
        stage1_losses=cat([_pad_steps(rep.stage1_losses, max(x.stage1_losses.shape[0] for x in reports))
                           for rep in reports]),
        stage1_steps=cat([rep.stage1_steps for rep in reports], 0),
        meta_losses=None if reports[0].meta_losses is None else cat([rep.meta_losses for rep in reports]),
        residual_norm=cat([rep.residual_norm for rep in reports]), timings=timings,
        **{k: None if getattr(reports[0], k) is None else cat([getattr(rep, k) for rep in reports], 0)
           for k in ("beta", "gamma", "planned_norm")},
    )


def _pad_steps(x: np.ndarray, steps: int) -> np.ndarray:
    """Stage I loss curves (steps_i, n) padded to ``steps`` rows with their last value."""
    return np.concatenate([x, np.repeat(x[-1:], steps - x.shape[0], axis=0)], axis=0) if x.shape[0] < steps else x


def evaluated_params(params: Any, params0: Any, layers: Sequence[int], editor: Editor) -> Any:
    """The parameters that are evaluated and exported: the stream's ``params`` with the edited kernels of
    ``layers`` replaced by ``editor.readout(W, W0)`` (W0 from the unedited ``params0``), e.g. PRUNE's
    restraint of the accumulated edit (docs/FORMULAS.md §B2).  ``params`` itself (no copy) for an editor
    without a readout.  The stream keeps evolving from ``params``."""
    if type(editor).readout is Editor.readout:
        return params
    layers = tuple(layers)
    kernels = editor.readout(w_out(params, layers), w_out(params0, layers))
    return with_w_out(params, layers, kernels)
