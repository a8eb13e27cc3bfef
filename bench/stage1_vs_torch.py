"""Stage I per request: this project (batched, jitted) vs the torch re-implementation of the reference
``compute_z`` loop that tests/test_targets.py uses as its oracle — in one run, on the same requests.

    python bench/stage1_vs_torch.py --n 10 --torch_n 3
    python bench/stage1_vs_torch.py --n 10 --torch_n 3 --prefix_reuse 0 --compact 0   # the old loop

SmolLM2 (embedded weights), reference settings: v_lr 0.1 (``--lr``), 25 steps, 10-token context
templates, edited layers 4–8 (L = 8), a batch of ``--n`` demo requests.  The JAX side is compiled
first (reported apart), then timed once; the torch side runs the first ``--torch_n`` requests one
at a time (the reference edits one request per compute_z call) on a torch copy of the same
weights.  Prints seconds per request of each, their ratio, and the Adam steps each took.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from configs.smollm2_cf import SMOLLM2_TUNED
from metake_jax.batch import EditBatch, prepare_batch
from metake_jax.data.loaders import load_demo
from metake_jax.targets import StageIConfig, optimize_targets
from metake_jax.templates import context_templates
from models.embedded import load_smollm2
from models.families import get as get_family
from models.hf_layout import params_to_hf
from tests import test_targets as oracle


def torch_model(cfg, params):
    """transformers model with the same weights (float32)."""
    hf_cfg = get_family(cfg.family).hf_config(cfg)
    model = getattr(transformers, hf_cfg["architectures"][0])(transformers.AutoConfig.for_model(**hf_cfg))
    sd = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in params_to_hf(cfg, params).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise RuntimeError(f"weight names: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        model.tie_weights()
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10, help="requests in the JAX batch")
    ap.add_argument("--torch_n", type=int, default=3, help="requests run through the torch loop")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--template_length", type=int, default=10)
    ap.add_argument("--prefix_reuse", type=int, default=1)
    ap.add_argument("--compact", type=int, default=1)
    a = ap.parse_args()
    cfg, params, tok = load_smollm2()
    tmpl = context_templates(cfg, params, tok, seed=0, length=a.template_length)
    reqs = [c.request for c in load_demo()][: a.n]
    L = SMOLLM2_TUNED["layers"][-1]
    hp = StageIConfig(lr=a.lr, steps=a.steps, prefix_reuse=bool(a.prefix_reuse), compact=bool(a.compact))
    print(f"SmolLM2, L={L}, lr {hp.lr}, steps {hp.steps}, "
          f"templates {sum(map(len, tmpl))} x {a.template_length} tokens, "
          f"prefix_reuse {hp.prefix_reuse}, compact {hp.compact}, row_groups {hp.row_groups}; "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    hb, n = prepare_batch(tok, reqs, tmpl)
    b = EditBatch(*map(jnp.asarray, hb))
    t = time.perf_counter()
    jax.block_until_ready(optimize_targets(cfg, params, b, L, hp).Z)  # compile (+ one run)
    first = time.perf_counter() - t
    t = time.perf_counter()
    r = optimize_targets(cfg, params, b, L, hp)
    jax.block_until_ready(r.Z)
    steady = time.perf_counter() - t
    jax_steps = np.asarray(r.steps_taken)[:n]
    print(f"jax: batch of {n}: first (incl. compile) {first:.1f} s, steady {steady:.1f} s = "
          f"{steady / n:.2f} s/request; "
          f"Adam steps {jax_steps.tolist()}", flush=True)

    # torch: the test oracle, with this run's templates and layer
    oracle.TEMPLATES, oracle.L = tmpl, L
    model = torch_model(cfg, params)
    times, errs = [], []
    for i, req in enumerate(reqs[: a.torch_n]):
        t = time.perf_counter()
        z = oracle.torch_compute_z(model, tok, req, hp)
        times.append(time.perf_counter() - t)
        errs.append(float(np.abs(np.asarray(r.Z)[:, i] - z).max() / np.abs(z).max()))
        print(f"torch request {i}: {times[-1]:.1f} s; max |Z_jax - Z_torch| / max|Z| = {errs[-1]:.2e}", flush=True)
    per_t = float(np.mean(times))
    print(f"torch: {per_t:.2f} s/request (mean of {len(times)}); jax: {steady / n:.2f} s/request; "
          f"ratio torch/jax = {per_t / (steady / n):.2f}; load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
