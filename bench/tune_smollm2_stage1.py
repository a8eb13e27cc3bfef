"""Stage I tuning grid on SmolLM2 (embedded): final new-target NLL after Stage I per (layers, lr, steps).

Prints, for the demo requests, the mean/max NLL of the new target at the last Stage I iteration
and the number of Adam steps taken. Usage: python bench/tune_smollm2_stage1.py [--n 20]
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax.numpy as jnp
import numpy as np

from metake_jax.batch import EditBatch, prepare_batch
from metake_jax.data.loaders import load_demo
from metake_jax.targets import StageIConfig, optimize_targets
from models.embedded import load_smollm2
from metake_jax.templates import context_templates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--grid", default="8:0.1:25,8:0.5:25,8:1.0:25,8:0.5:40,6:0.5:25,12:0.5:25")
    a = ap.parse_args()
    cfg, params, tok = load_smollm2()
    tmpl = context_templates(cfg, params, tok, seed=0)
    print("templates:", tmpl)
    reqs = [c.request for c in load_demo()][: a.n]
    b, n = prepare_batch(tok, reqs, tmpl)
    b = EditBatch(*map(jnp.asarray, b))
    print(f"{'L':>3} {'lr':>5} {'steps':>5} {'nll0':>7} {'nll_end':>8} {'nll_max':>8} {'steps_mean':>10} {'sec':>6}")
    for g in a.grid.split(","):
        L, lr, steps = g.split(":")
        hp = StageIConfig(lr=float(lr), steps=int(steps))
        t = time.perf_counter()
        r = optimize_targets(cfg, params, b, int(L), hp)
        nll = np.asarray(r.nll)[:, :n]
        taken = np.asarray(r.steps_taken)[:n]
        last = nll[np.minimum(taken, nll.shape[0] - 1), np.arange(n)]
        print(f"{L:>3} {lr:>5} {steps:>5} {nll[0].mean():7.3f} {last.mean():8.3f} {last.max():8.3f} "
              f"{taken.mean():10.1f} {time.perf_counter() - t:6.1f}", flush=True)


if __name__ == "__main__":
    main()
