"""Precompute and cache the layer statistics C0 = E[kkᵀ] of a config's edited layers (docs/FORMULAS.md §R3).

    python launch/stats.py --config=configs/smollm2_cf.py
    python launch/stats.py --config=configs/gptj_cf.py --config.model=/models/gpt-j-6B --config.stats.n_samples=100000

Uses the same fields as launch/edit.py (model, dtype, layers, stats.*); the cache lands in
``config.stats.cache_dir`` where later runs find it.  ``--projector`` also prints the
null-space projector ranks for ``editor.nullspace_threshold``.
"""
from __future__ import annotations

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "run configuration file (configs/*.py)")
_PROJ = flags.DEFINE_bool("projector", True, "also compute the null-space projector ranks")


def main(argv: list[str]) -> None:
    from launch._common import checked_config, setup_logging

    c = checked_config(argv, _CONFIG.value)
    setup_logging()
    import numpy as np

    from metake_jax.runner import RunConfig, edit_config, layer_statistics, load_model_spec, model_id_for, stats_cache_dir

    rc = RunConfig.of(c)  # one-line error naming a bad field (launch._common.run_cli)
    layers = edit_config(rc).layers  # the method's editor's own layers, or the run's
    t = time.perf_counter()
    cfg, params, tok = load_model_spec(rc.model, dtype=rc.dtype, seed=rc.seed)
    mid = rc.model_id or model_id_for(rc.model, cfg, rc.seed, rc.dtype)
    C0 = layer_statistics(rc, cfg, params, tok, mid)
    print(f"C0 for layers {layers} of {mid}: shape {tuple(C0.shape)}, "
          f"trace/d_k {[round(float(np.trace(np.asarray(x))) / x.shape[0], 5) for x in C0]}, "
          f"{time.perf_counter() - t:.1f}s; cache {stats_cache_dir(rc)}")
    if _PROJ.value:
        from metake_jax.projector import projectors_for_layers

        _, ranks = projectors_for_layers(C0, threshold=rc.editor.nullspace_threshold, energy=rc.editor.energy,
                                         layers=layers)
        print(f"null-space projector ranks (threshold {rc.editor.nullspace_threshold}): {list(map(int, ranks))} "
              f"of d_k={cfg.d_ff}")


if __name__ == "__main__":
    from launch._common import run_cli

    run_cli(main)
