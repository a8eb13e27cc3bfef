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

    def state(self) -> EditState:
        return init_state(self.params, self.cfg, self.layers, P=self.P, C0=self.C0)

    def stats(self, layers: tuple[int, ...] | None = None) -> LayerStats:
        """LayerStats (C_p = 0) for ``layers`` (a suffix/subset of the configured edited layers)."""
        layers = layers or self.layers
        idx = jnp.asarray([self.layers.index(l) for l in layers])
        m, dk = len(layers), self.cfg.d_ff
        return LayerStats(P=self.P[idx], C0=self.C0[idx], Cp=jnp.zeros((m, dk, dk), jnp.float32))


def prepare(c: Any, *, run_dir: str | Path | None = None) -> Setup:
    """Load everything a config describes (statistics and templates come from their caches)."""
    dtype = str(runner._get(c, "dtype", "float32"))
    cfg, params, tok = runner.load_model_spec(str(c.model), dtype=dtype, seed=int(runner._get(c, "seed", 0)),
                                              remat=bool(runner._get(c, "remat", False)))
    model_id = runner.model_id_for(str(c.model), cfg, int(runner._get(c, "seed", 0)), dtype)
    rd = Path(run_dir or c.run_dir).expanduser()
    rd.mkdir(parents=True, exist_ok=True)
    templates = runner.get_templates(c, cfg, params, tok, rd, model_id)
    layers = tuple(int(l) for l in c.layers)
    C0 = runner.layer_statistics(c, cfg, params, tok, model_id)
    P, ranks = projectors_for_layers(
        C0, threshold=float(c.editor.nullspace_threshold), energy=runner._get(c, "editor.energy"))
    cases = runner.load_run_cases(c, tok)
    return Setup(cfg=cfg, params=params, tokenizer=tok, templates=templates, layers=layers, C0=C0, P=P,
                 ranks=ranks, cases=cases, edit_config=runner.edit_config(c), model_id=model_id)
