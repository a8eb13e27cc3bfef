"""Throughput of the layer-statistics pass (docs/FORMULAS.md §4) and of the projector eigendecomposition.

    PYTHONPATH=. .venv/bin/python bench/stats_speed.py [--layers 3 4 5 6 7] [--max-len 512]
        [--n-docs 64] [--token-budget 8192] [--random-weights] [--results bench/RESULTS.md --machine "..."]

Model: SmolLM2-135M (``models.embedded.load_smollm2``) or, when that is unavailable or
``--random-weights``, a random model of the same shape (d=576, 30 layers, 9 heads, 3 kv heads,
d_ff=1536, vocab 49152, tied).  Documents are random token ids (throughput does not depend on the
text): one run of full-length documents and one of mixed lengths through the length buckets.
The first pass over each bucket shape includes compilation; it is reported separately.
Prints figures; with ``--results`` replaces the "## Statistics and projector" section of that file.
"""
from __future__ import annotations

import argparse
import datetime as dt
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from metake_jax.editors import alphaedit as AE, memit as ME
from metake_jax import stats as S
from metake_jax.projector import nullspace_projector, projectors_for_layers
from models.random_model import random_config, random_params

SECTION = "## Statistics and projector"


def random_model(seed: int = 0):
    """Random weights of SmolLM2-135M's shape (tied head, rope_theta 1e5), kernels N(0, 0.02²)."""
    cfg = random_config("llama", "smollm2-135m").replace(
        tie_embeddings=True, rope_theta=100000.0, max_positions=8192, name="random-smollm2-shape")
    return cfg, random_params(cfg, seed, std=0.02)


def load_model(random_weights: bool, shape: str | None = None):
    if shape:  # e.g. "gptj:gpt-j-6b" -- any models.random_model preset, built on device
        from models.random_model import random_config, random_params

        fam, size = shape.split(":")
        cfg = random_config(fam, size)
        return cfg, random_params(cfg, 0), f"random weights, {fam} {size} shape"
    if not random_weights:
        try:
            from models.embedded import load_smollm2

            cfg, params, _ = load_smollm2()
            return cfg, params, "SmolLM2-135M-Instruct (embedded)"
        except Exception as e:  # noqa: BLE001 - fall back to the same shape
            print(f"load_smollm2 unavailable ({type(e).__name__}: {e}); using random weights")
    cfg, params = random_model()
    return cfg, params, "random weights, SmolLM2-135M shape"


class _Lines(list):
    """The figures, each printed as soon as it is measured (a killed run still shows what it had)."""

    def append(self, line: str) -> None:
        print(line, flush=True)
        super().append(line)


def timed_pass(cfg, params, batches, layers, precision="highest"):
    t0 = time.perf_counter()
    sums, count = S.accumulate_second_moment(cfg, params, batches, layers, precision=precision)
    jax.block_until_ready(sums)
    return time.perf_counter() - t0, count, sums


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[3, 4, 5, 6, 7])
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--n-docs", type=int, default=64)
    ap.add_argument("--token-budget", type=int, default=8192)
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--shape", default=None, help="random model preset family:size, e.g. gptj:gpt-j-6b")
    ap.add_argument("--n-req", type=int, default=100, help="requests in the timed closed-form solves")
    ap.add_argument("--skip", nargs="*", default=[], choices=["mixed", "eigh", "alphaedit", "memit"],
                    help="parts not to time (e.g. the float64 MEMIT solve on a GPU host)")
    ap.add_argument("--precision", nargs="+", default=["highest"], choices=sorted(S.PRECISIONS),
                    help="Σ k kᵀ matmul precision(s) of the full-length pass (one line each)")
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--machine", default="2-core CPU dev box")
    args = ap.parse_args()

    # no global matmul precision: the forward runs at the library's default, the covariance einsum at
    # HIGHEST (metake_jax.stats), as in launch/stats.py
    cfg, params, label = load_model(args.random_weights, args.shape)
    layers = tuple(args.layers)
    rng = np.random.default_rng(0)
    lines = _Lines()
    lines.append(f"model: {label}; layers {layers}; d_k={cfg.d_key}; devices: {jax.device_count()} x "
                 f"{jax.devices()[0].platform}; token budget {args.token_budget}; max_len {args.max_len}")

    # full-length documents: one bucket shape
    full = [rng.integers(0, cfg.vocab_size, size=args.max_len).tolist() for _ in range(args.n_docs)]
    batches = S.make_batches(full, max_len=args.max_len, token_budget=args.token_budget)
    warm = batches[:1]
    for prec in args.precision:
        t_first, n_first, _ = timed_pass(cfg, params, warm, layers, prec)  # includes compilation
        t, n, _ = timed_pass(cfg, params, batches, layers, prec)
        lines.append(f"stats pass ({prec} precision), {len(full)} docs x {args.max_len} tokens ({len(batches)} "
                     f"batches of {batches[0][0].shape}): {n / t:,.0f} tokens/s ({n} tokens in {t:.2f} s; "
                     f"first batch incl. compile {t_first:.2f} s)")

    # mixed lengths through the length buckets (compile each bucket first)
    skip = set(args.skip)
    if "mixed" not in skip:
        _mixed_pass(cfg, params, args, rng, layers, lines)
    d_k = cfg.d_key
    if "eigh" not in skip or "alphaedit" not in skip or "memit" not in skip:
        A = jax.random.normal(jax.random.PRNGKey(0), (d_k, d_k), jnp.float32) / np.sqrt(d_k)
        C0 = jax.block_until_ready(A @ A.T * 0.05)  # on device: d_k = 16384 is 4 TFLOP
    P = _eigh(C0, layers, lines) if "eigh" not in skip else None
    if "alphaedit" not in skip or "memit" not in skip:
        if P is None and "alphaedit" not in skip:
            P = nullspace_projector(C0)
        _solves(cfg, C0, P, args.n_req, rng, skip, lines)

    if args.results is not None:
        write_section(args.results, args.machine, lines)


def _mixed_pass(cfg, params, args, rng, layers, lines) -> None:
    lengths = np.clip(rng.geometric(1 / (args.max_len / 4), size=args.n_docs), 1, args.max_len)
    mixed = [rng.integers(0, cfg.vocab_size, size=int(k)).tolist() for k in lengths]
    mb = S.make_batches(mixed, max_len=args.max_len, token_budget=args.token_budget)
    shapes = sorted({b[0].shape for b in mb})
    t_c = time.perf_counter()
    for shp in shapes:
        jax.block_until_ready(S.second_moment_step(cfg, params, np.zeros(shp, np.int32), np.ones(shp, bool), layers))
    t_c = time.perf_counter() - t_c
    t, n, _ = timed_pass(cfg, params, mb, layers)
    padded = sum(b[0].size for b in mb)
    lines.append(f"stats pass, {len(mixed)} mixed-length docs (mean {lengths.mean():.0f} tokens; {len(shapes)} "
                 f"bucket shapes, padding overhead {padded / n - 1:.0%}): {n / t:,.0f} tokens/s "
                 f"(compile of all buckets {t_c:.1f} s)")


def _eigh(C0, layers, lines):
    """Projector eigendecomposition at d_k: one layer, then the per-layer stack. Returns that layer's P."""
    d_k = C0.shape[0]
    nullspace_projector(C0).block_until_ready()  # compile
    t0 = time.perf_counter()
    P = nullspace_projector(C0).block_until_ready()
    lines.append(f"nullspace_projector (eigh + P) d_k={d_k}: {time.perf_counter() - t0:.2f} s per layer")
    stack = jnp.stack([C0] * len(layers))
    projectors_for_layers(stack)[0].block_until_ready()
    t0 = time.perf_counter()
    projectors_for_layers(stack)[0].block_until_ready()
    lines.append(f"projectors_for_layers, {len(layers)} layers, d_k={d_k}: {time.perf_counter() - t0:.2f} s")
    return P


def _solves(cfg, C0, P, n_req, rng, skip, lines) -> None:
    """Closed-form solves at d_k (n = ``n_req`` requests, d = d_model)."""
    d_k = C0.shape[0]
    K = jnp.asarray(rng.normal(size=(d_k, n_req)).astype(np.float32))
    R = jnp.asarray(rng.normal(size=(cfg.d_model, n_req)).astype(np.float32))
    Cp = K @ K.T
    todo = []
    if "alphaedit" not in skip:
        todo.append(("alphaedit_increment float32", lambda: AE.alphaedit_increment(K, R, P, Cp, 10.0)))
    if "memit" not in skip:
        todo.append(("memit_increment float64", lambda: ME.memit_increment(K, R, C0 + 1e-3 * jnp.eye(d_k), 15000.0)))
    for name, fn in todo:
        jax.block_until_ready(fn())
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        lines.append(f"{name}, d_k={d_k}, n={n_req}: {time.perf_counter() - t0:.2f} s")


def write_section(path: Path, machine: str, lines: list[str]) -> None:
    """Replace (or append) only the "## Statistics and projector" section of ``path``."""
    today = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    body = (f"{SECTION}\n\nMachine: {machine}; date {today}; command `PYTHONPATH=. .venv/bin/python "
            f"bench/stats_speed.py`.\n\n" + "\n".join(f"- {ln}" for ln in lines) + "\n")
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    pat = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pat.search(text):
        text = pat.sub(body + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + body
    path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
