"""Shared set-up for launchers and benchmarks: model, templates, statistics, projectors, cases.

Reuses the runner's pieces (model spec loading, cached templates, cached layer statistics) so a
diagnostic run sees exactly what ``launch/edit.py`` would.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from metake_jax import runner
from metake_jax.editor import EditConfig, EditState, init_state
from metake_jax.projector import projectors_for_layers
from metake_jax.requests import Case
from metake_jax.editors import LayerStats
from models.config import ModelConfig


@dataclasses.dataclass
class Setup:
    cfg: ModelConfig
    params: Any
    tokenizer: Any
    templates: list[list[str]]
    layers: tuple[int, ...]
    C0: Any
    P: Any
    ranks: Any
    cases: list[Case]
    edit_config: EditConfig
    model_id: str
    config: runner.RunConfig

    def state(self) -> EditState:
        return init_state(self.params, self.cfg, self.layers, P=self.P, C0=self.C0)

    def stats(self, layers: tuple[int, ...] | None = None) -> LayerStats:
        """LayerStats (C_p = 0) for ``layers`` (a suffix/subset of the configured edited layers)."""
        layers = layers or self.layers
        idx = jnp.asarray([self.layers.index(l) for l in layers])
        m, dk = len(layers), self.cfg.d_ff
        return LayerStats(P=self.P[idx], C0=self.C0[idx], Cp=jnp.zeros((m, dk, dk), jnp.float32))


def prepare(c: Any, *, run_dir: str | Path | None = None) -> Setup:
    """Load everything a config (a ``RunConfig`` or a ConfigDict, validated once) describes; statistics
    and templates come from their caches.  Raises what ``runner.setup`` raises."""
    rc = runner.RunConfig.of(c)
    cfg, params, tok = runner.load_model_spec(rc.model, dtype=rc.dtype, seed=rc.seed, remat=rc.remat)
    model_id = rc.model_id or runner.model_id_for(rc.model, cfg, rc.seed, rc.dtype)
    rd = Path(run_dir or rc.run_dir).expanduser()
    rd.mkdir(parents=True, exist_ok=True)
    templates = runner.get_templates(rc, cfg, params, tok, rd, model_id)
    C0 = runner.layer_statistics(rc, cfg, params, tok, model_id)
    P, ranks = projectors_for_layers(C0, threshold=rc.editor.nullspace_threshold, energy=rc.editor.energy)
    cases = runner.load_run_cases(rc, tok)
    ecfg = runner.edit_config(rc)
    return Setup(cfg=cfg, params=params, tokenizer=tok, templates=templates, layers=ecfg.layers, C0=C0, P=P,
                 ranks=ranks, cases=cases, edit_config=ecfg, model_id=model_id, config=rc)
