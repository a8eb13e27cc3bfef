"""One edit batch, end to end, and the sequential edit state (docs/FORMULAS.md §3–§6, §9).

``edit_batch``: tokenize → Stage I targets (one jitted computation for the batch) → optional
MetaKE refinement (one jitted scan) → multi-layer write (one jitted scan) → all-or-nothing
application → C_p update with the batch's keys recomputed on the edited model.
The state ``(params, LayerStats, n_edits)`` is a pytree carried from batch to batch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metake_jax.batch import EditBatch, prepare_batch, rows_per_request, select_rows
from metake_jax.errors import EditError
from metake_jax.metake import MetaKEConfig, refine_targets
from metake_jax.targets import StageIConfig, optimize_targets
from metake_jax.tokens import ChatFormat
from metake_jax.write import (
    EditorConfig, LayerStats, apply_deltas, check_write, multilayer_write, updated_key_cache,
)
from models.config import ModelConfig

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class EditConfig:
    """What to do with a batch: edited layers, Stage I, downstream editor, optional MetaKE."""

    layers: tuple[int, ...]
    stage1: StageIConfig = StageIConfig()
    editor: EditorConfig = EditorConfig()
    metake: MetaKEConfig | None = None

    def __post_init__(self) -> None:
        if not self.layers or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"edited layers must be a non-empty increasing tuple, got {self.layers}")


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
        return out


_write = jax.jit(multilayer_write, static_argnames=("cfg", "layers", "ecfg"))


def _x64(ecfg: EditorConfig):
    return jax.enable_x64(True) if jnp.dtype(ecfg.solve_dtype) == jnp.float64 else contextlib.nullcontext()


def _timed(timings: dict[str, float], key: str, fn, *args, **kw):
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kw))
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - t
    return out


def look_rows(batch: EditBatch, mcfg: MetaKEConfig) -> EditBatch | None:
    """Rows scoring the virtual model: None (all) or the bare + KL rows of each request."""
    if mcfg.prompts == "all":
        return None
    per = rows_per_request(batch)
    keep = (int(np.asarray(batch.bare_row)[0]), per - 1)  # the KL row is last in each block
    return EditBatch(*[jnp.asarray(x) for x in select_rows(batch, keep)])


def compute_targets(
    cfg: ModelConfig, state: EditState, batch: EditBatch, ecfg: EditConfig, timings: dict[str, float],
    look_batch: EditBatch | None = None,
) -> tuple[Array, Any, Any]:
    """Stage I and (if configured) the MetaKE refinement. Returns (Z, stage1 result, refine result)."""
    L = ecfg.layers[-1]
    s1 = _timed(timings, "stage1", optimize_targets, cfg, state.params, batch, L, ecfg.stage1)
    Z, ref = s1.Z, None
    if ecfg.metake is not None and ecfg.metake.steps > 0:
        with _x64(ecfg.editor):
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
    with _x64(ecfg.editor):
        deltas, aux = _timed(timings, "write", _write, cfg, state.params, batch, Z, ecfg.layers,
                             state.stats, ecfg.editor)
    check_write(aux, ecfg.layers)
    new_params = apply_deltas(state.params, ecfg.layers, deltas)  # raises EditError, state untouched
    Cp, finite = _timed(timings, "cache", updated_key_cache, cfg, new_params, batch, ecfg.layers, state.stats.Cp)
    if not bool(finite):
        raise EditError("non-finite keys after the edit: batch not written")
    stats = state.stats._replace(Cp=Cp)
    n = int(np.asarray(batch.valid).sum())
    return EditState(params=new_params, stats=stats, n_edits=state.n_edits + n), aux


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
    ``EditError`` when the write is refused; either way ``state`` is unchanged."""
    if ecfg.editor.method == "alphaedit" and state.stats.P is None:
        raise EditError("AlphaEdit needs null-space projectors P: compute layer statistics first")
    if ecfg.editor.method == "memit" and state.stats.C0 is None:
        raise EditError("MEMIT needs layer statistics C0: compute layer statistics first")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    host_batch, n = prepare_batch(tokenizer, requests, templates, n_pad=n_pad, chat=chat,
                                  max_positions=cfg.max_positions)
    batch = EditBatch(*[jnp.asarray(x) for x in host_batch])
    lb = look_rows(host_batch, ecfg.metake) if ecfg.metake is not None else None
    timings["prepare"] = time.perf_counter() - t0
    Z, s1, ref = compute_targets(cfg, state, batch, ecfg, timings, lb)
    new_state, aux = write_targets(cfg, state, batch, Z, ecfg, timings)
    timings["total"] = time.perf_counter() - t0
    report = BatchReport(
        case_ids=[getattr(r, "case_id", None) for r in requests],
        stage1_losses=np.asarray(s1.losses)[:, :n], stage1_steps=np.asarray(s1.steps_taken)[:n],
        meta_losses=None if ref is None else np.asarray(ref.losses)[:, :n],
        residual_norm=np.asarray(aux.residual_norm)[:, :n], timings=timings,
    )
    return new_state, report
