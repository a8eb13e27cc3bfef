"""Throughput of KV-cached generation (models/generate.py) on SmolLM2-135M.

    PYTHONPATH=. .venv/bin/python bench/generate_speed.py [--batch 64] [--new 128] [--prompt-len 8]
        [--random-weights] [--results bench/RESULTS.md --machine "2-core CPU dev box"]

Model: SmolLM2-135M (``models.embedded.load_smollm2``) or, when that is unavailable or
``--random-weights``, a random model of the same shape (d=576, 30 layers, 9 heads, 3 kv heads,
d_ff=1536, vocab 49152, tied).  Prompts are random token ids of ``--prompt-len`` tokens (the
throughput does not depend on the text).  Reports the first call (compilation included) and the
best of ``--repeats`` steady calls for top-k 5 sampling and greedy decoding, plus the time of the
context templates (docs/FORMULAS.md §2) with the real tokenizer.  With ``--results`` the "## Generation"
section of that file is replaced (other sections untouched).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import resource
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from models.random_model import random_config, random_params
from metake_jax.templates import context_templates
from models.generate import generate, sample_texts

SECTION = "## Generation"


def random_model(seed: int = 0):
    """Random weights of SmolLM2-135M's shape (tied head, rope_theta 1e5), kernels N(0, 0.02²)."""
    cfg = random_config("llama", "smollm2-135m").replace(
        tie_embeddings=True, rope_theta=100000.0, max_positions=8192, name="random-smollm2-shape")
    return cfg, random_params(cfg, seed, std=0.02), None


def load_model(random_weights: bool):
    if not random_weights:
        try:
            from models.embedded import load_smollm2

            return (*load_smollm2(), "SmolLM2-135M-Instruct (embedded, float32)")
        except Exception as e:  # noqa: BLE001 - report and fall back
            print(f"load_smollm2 unavailable ({type(e).__name__}: {e}); using random weights")
    return (*random_model(), "random weights, SmolLM2-135M shape")


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn, repeats: int) -> tuple[float, float, float]:
    """(first call seconds, best steady call wall seconds, its process CPU seconds)."""
    t = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t
    best, best_cpu = float("inf"), float("nan")
    for _ in range(repeats):
        t, c = time.perf_counter(), _cpu_seconds()
        jax.block_until_ready(fn())
        if time.perf_counter() - t < best:
            best, best_cpu = time.perf_counter() - t, _cpu_seconds() - c
    return first, best, best_cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new", type=int, default=128, help="new tokens per row")
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--machine", default="2-core CPU dev box")
    args = ap.parse_args()

    cfg, params, tok, model_name = load_model(args.random_weights)
    print(f"model: {model_name}; jax {jax.__version__} on {jax.devices()[0].platform}")
    rng = np.random.default_rng(0)
    toks = rng.integers(0, cfg.vocab_size, (args.batch, args.prompt_len)).astype(np.int32)
    mask = np.ones_like(toks, bool)
    n_tok = args.batch * args.new
    lines = []
    for label, kw in (("top-k 5 sampling", dict(top_k=5, rng=jax.random.key(0))), ("greedy", {})):
        def run(kw=kw):
            return generate(cfg, params, toks, mask, max_new_tokens=args.new, **kw).tokens

        first, best, cpu = timed(run, args.repeats)
        line = (f"{label}: batch {args.batch} x {args.new} new tokens (prompt {args.prompt_len}): "
                f"{n_tok / best:,.0f} tokens/s wall ({best:.1f} s/call, {cpu:.1f} CPU-s/call = "
                f"{n_tok / cpu:,.0f} tokens per CPU-second; first call incl. compile {first:.1f} s; "
                f"load average {os.getloadavg()[0]:.1f})")
        print(line)
        lines.append(line)
    if tok is not None:
        t = time.perf_counter()
        tpl = context_templates(cfg, params, tok, seed=0)
        line = f"context templates (5 x 10 tokens, incl. compile): {time.perf_counter() - t:.1f} s"
        print(line)
        lines.append(line)
        print("templates:", tpl)
        t = time.perf_counter()
        texts = sample_texts(cfg, params, tok, ["The capital of France is"], max_out_len=40, seed=0)
        print(f"sample ({time.perf_counter() - t:.1f} s): {texts[0]!r}")
    if args.results is not None:
        write_section(args.results, args.machine, model_name, args, lines)


def write_section(path: Path, machine: str, model_name: str, args, lines: list[str]) -> None:
    today = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    cmd = (f"PYTHONPATH=. .venv/bin/python bench/generate_speed.py --batch {args.batch} --new {args.new} "
           f"--prompt-len {args.prompt_len}" + (" --random-weights" if args.random_weights else ""))
    body = (f"{SECTION}\n\nMachine: {machine}; date {today}; model {model_name}; float32; "
            f"KV-cached `models.generate`; command `{cmd}`.\n\n" + "".join(f"- {l}\n" for l in lines) + "\n")
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    pat = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pat.sub(lambda _: body, text) if pat.search(text) else text.rstrip("\n") + "\n\n" + body
    path.write_text(text)
    print(f"wrote {SECTION!r} to {path}")


if __name__ == "__main__":
    main()
