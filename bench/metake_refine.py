"""MetaKE refinement alone on SmolLM2 (docs/FORMULAS.md §6 "Units"): how far ℓ_meta falls and Z moves.

    python bench/metake_refine.py --n 20 T=15,eta=0.001 T=15,eta=0.003 \
        T=15,eta=0.3,anchor=absolute,ls=none T=3,eta=0.001,ls=request

Each spec is ``key=value`` pairs: T (outer steps), eta (η), anchor (relative | absolute), ls (line
search: batch | request | none), a (anchor weight), pack (1: packed look rows, the runner's default;
0: length-sorted groups).  Stage I targets Z⁰ of the first n CounterFact
cases (as in ``bench/metake_smollm2.py``, whose cached Z⁰ is reused) are refined with each spec;
per spec it prints the seconds of the first call (compilation included) and of a second, steady
call, loss-and-gradient evaluations per outer
step, the mean ℓ_meta along the path, its relative drop, the median relative move
‖z − z⁰‖/‖r⁰‖, the mean accepted η, and how many (request, step) pairs saw their own ℓ_meta rise
(and how many steps saw the batch's Σ ℓ_meta rise).
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from metake_smollm2 import config, stage1_targets  # noqa: E402  (same folder)
from metake_jax.batch import EditBatch, prepare_batch  # noqa: E402
from metake_jax.editor import look_rows  # noqa: E402
from metake_jax.experiment import prepare  # noqa: E402
from metake_jax.metake import MetaKEConfig, refine_targets  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("specs", nargs="+")
    a = ap.parse_args()
    s = prepare(config(a.n, a.n))
    cases = s.cases[: a.n]
    hb, n = prepare_batch(s.tokenizer, [x.request for x in cases], s.templates)
    b = EditBatch(*map(jnp.asarray, hb))
    Z0 = stage1_targets(s, cases, b)
    state, ec = s.state(), s.edit_config
    for spec in a.specs:
        kw = dict(x.split("=") for x in spec.split(","))
        mc = MetaKEConfig(steps=int(kw.get("T", 15)), lr=float(kw.get("eta", 3e-3)), prompts="bare",
                          anchor=kw.get("anchor", "relative"), line_search=kw.get("ls", "batch"),
                          anchor_weight=float(kw.get("a", 1.0)))
        lb = look_rows(hb, mc, pack=kw.get("pack", "1") == "1")
        seconds = []
        for _ in range(2):  # first call: compilation included; second: steady
            t = time.perf_counter()
            r = jax.block_until_ready(refine_targets(s.cfg, s.params, b, Z0, s.layers, state.stats, ec.editor, mc, lb))
            seconds.append(time.perf_counter() - t)
        L = np.asarray(r.losses)[:, :n]
        mean = L.mean(1)
        print(spec, "s first/steady", [round(x, 1) for x in seconds], "look positions",
              sum(int(np.prod(g.tokens.shape)) for g in lb.groups), "real", sum(int(g.mask.sum()) for g in lb.groups),
              "evaluations/step", np.asarray(r.trials).tolist(),
              "mean ℓ_meta", np.round(mean[:: max(1, len(mean) // 5)], 4).tolist(),
              "drop", round(float(1 - mean[-1] / mean[0]), 3),
              "move median", round(float(np.median(np.asarray(r.move)[:n])), 4),
              "accepted η mean", float(np.asarray(r.step_sizes)[:, :n].mean()),
              "request rises", int((np.diff(L, axis=0) > 1e-7).sum()), "of", L.size - n,
              "batch rises", int((np.diff(L.sum(1)) > 1e-6).sum()), flush=True)


if __name__ == "__main__":
    main()
