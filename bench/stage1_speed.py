"""Stage I wall time on SmolLM2: n requests batched (one jitted computation) vs one at a time.

    python bench/stage1_speed.py --ns 1,10,100 --singles 10
    python bench/stage1_speed.py --ns 20 --singles 0 --stats_docs 0 --row_groups 1,4 \
        --data ../shared/data/counterfact_easyedit/counterfact-edit.json --format flat --template_length 5

For each n: compiled ahead of time, then one timed run (steady state; compile reported apart). "One at a time" runs the
first ``--singles`` requests separately (after their compile) and scales the mean to n.
Requests: the bundled demo set (or ``--data``), cycled to n; templates sampled once (seed 0).  ``--row_groups``
times each listed number of length-sorted row groups (``StageIConfig.row_groups``) and prints the
fraction of computed tokens that are real (not padding).
Also prints the statistics throughput (tokens/s) of one pass over a model-sampled corpus.
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

from configs.smollm2_cf import SMOLLM2_TUNED
from metake_jax.batch import EditBatch, prepare_batch
from metake_jax.data.loaders import load_cases, load_demo
from metake_jax.targets import StageIConfig, group_sizes, optimize_targets_grouped, row_groups
from models.embedded import load_smollm2
from metake_jax.templates import context_templates


def run(cfg, params, tok, reqs, tmpl, L, hp) -> tuple[float, float, int, float]:
    """(compile + run, run, max Stage I updates, real / computed tokens): AOT-compiled, run once."""
    hb, n = prepare_batch(tok, reqs, tmpl)
    b = EditBatch(*map(jnp.asarray, hb))
    t = time.perf_counter()
    order, widths = row_groups(hb, hp.row_groups, hp.prefix_reuse)
    sizes = group_sizes(len(order), len(widths))
    if hp.prefix_reuse:  # tokens each step runs: the suffixes (subject's last token on)
        real = float((hb.mask.sum(axis=1) - hb.lookup).sum())
        fill = real / sum(s * w.suffix for s, w in zip(sizes, widths))
    else:
        fill = float(hb.mask.sum()) / sum(s * w for s, w in zip(sizes, widths))
    order = jnp.asarray(order)
    compiled = optimize_targets_grouped.lower(cfg, params, b, order, L, hp, widths).compile()
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    r = jax.block_until_ready(compiled(params, b, order))
    run_s = time.perf_counter() - t
    return compile_s + run_s, run_s, int(np.asarray(r.steps_taken)[:n].max()), fill


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", default="1,10,100")
    ap.add_argument("--singles", type=int, default=10)
    ap.add_argument("--stats_docs", type=int, default=32)
    ap.add_argument("--data", default="demo", help="'demo' or a CounterFact / ZsRE file")
    ap.add_argument("--format", default="auto", help="data format (flat, rome, zsre, auto)")
    ap.add_argument("--template_length", type=int, default=10, help="context template length (tokens)")
    ap.add_argument("--row_groups", default=str(StageIConfig.row_groups),
                    help="comma list of length-sorted row-group counts to time (1 = one padded width)")
    ap.add_argument("--prefix_reuse", default="1", help="comma list of StageIConfig.prefix_reuse values (0, 1) to time")
    a = ap.parse_args()
    cfg, params, tok = load_smollm2()
    tmpl = context_templates(cfg, params, tok, seed=0, length=a.template_length)
    n_max = max(max(int(x) for x in a.ns.split(",")), a.singles)
    cases = load_demo() if a.data == "demo" else load_cases(a.data, a.format, n=n_max, tokenizer=tok)
    demo = [c.request for c in cases]
    L = SMOLLM2_TUNED["layers"][-1]
    groups = [int(x) for x in a.row_groups.split(",")]
    hp = StageIConfig(lr=SMOLLM2_TUNED["lr"], steps=SMOLLM2_TUNED["steps"], row_groups=groups[0])
    print(f"device: {jax.devices()[0].device_kind}; "
          f"layers {SMOLLM2_TUNED['layers']}; lr {hp.lr}; steps {hp.steps}")
    single = []
    for r in demo[: a.singles]:
        single.append(run(cfg, params, tok, [r], tmpl, L, hp)[1])
    per_req = float(np.mean(single)) if single else float("nan")
    if single:
        print(f"one at a time: {per_req:.2f} s/request (mean of {len(single)}, steady state)")
    reuse = [bool(int(x)) for x in a.prefix_reuse.split(",")]
    hp = dataclasses.replace(hp, prefix_reuse=reuse[0])
    print(f"{'n':>5} {'groups':>6} {'reuse':>5} {'real/computed':>13} {'batched first (s)':>18} {'batched steady (s)':>19} "
          f"{'max steps':>9} {'one-at-a-time (s)':>18} {'speed-up':>8}")
    for n in [int(x) for x in a.ns.split(",")]:
        reqs = [demo[i % len(demo)] for i in range(n)]
        for g, pr in [(g, pr) for g in groups for pr in reuse]:
            first, steady, steps, fill = run(cfg, params, tok, reqs, tmpl, L,
                                             dataclasses.replace(hp, row_groups=g, prefix_reuse=pr))
            seq = per_req * n
            print(f"{n:>5} {g:>6} {int(pr):>5} {fill:13.3f} {first:18.1f} {steady:19.1f} {steps:>9} {seq:18.1f} "
                  f"{seq / steady:8.2f}", flush=True)

    if a.stats_docs <= 0:
        return
    from metake_jax.stats import accumulate_second_moment, corpus_from_model, make_batches, tokenize_corpus

    texts = corpus_from_model(cfg, params, tok, a.stats_docs, 128, seed=1)
    toks = tokenize_corpus(tok, texts, 128)
    batches = list(make_batches(toks, max_len=128))
    layers = tuple(SMOLLM2_TUNED["layers"])
    jax.block_until_ready(accumulate_second_moment(cfg, params, batches, layers))  # compile
    t = time.perf_counter()
    sums, count = jax.block_until_ready(accumulate_second_moment(cfg, params, batches, layers))
    dt = time.perf_counter() - t
    print(f"statistics: {count} tokens in {dt:.2f} s = {count / dt:.0f} tokens/s (layers {layers})")


if __name__ == "__main__":
    main()
