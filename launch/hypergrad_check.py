"""Exact vs proxy hypergradient fidelity (docs/FORMULAS.md §7, paper C.5).

For the first ``--n`` cases of a config (one batch): Stage I targets Z⁰, then at Z⁰ the exact
multi-layer hypergradient and the Structural Gradient Proxy, and per request:
cos(g_proxy, g_exact), cos(g_final, g_exact) (what the earlier layers change), cos(g_proxy, g_final)
(the final layer's linearisation point); the one-step relative reduction of F (basis points) for
g ∈ {exact, proxy, key-only, none} at the same η and at equal step length; leakage ratio ρ; proxy
gap ε.  The anchor and step units are the config's (``metake.anchor``).
Writes ``hypergrad.json``, ``hypergrad_cos.png``, ``hypergrad_reduction.png`` and ``hypergrad.md``.

    python launch/hypergrad_check.py --config=configs/smollm2_cf.py --n=32 --eta=0.5
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Model/dataset config (configs/*.py).")
_N = flags.DEFINE_integer("n", 32, "Number of requests (one batch).")
_ETA = flags.DEFINE_float("eta", None, "Step size η for the one-step reductions (default: config.metake.lr).")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: <run_dir>/hypergrad).")


def summarize(rows: list[dict], eta: float, layers: tuple[int, ...], seconds: dict) -> str:
    import numpy as np

    cos = np.array([r["cos"] for r in rows])
    cos_fe = np.array([r["cos_final_exact"] for r in rows])
    cos_pf = np.array([r["cos_proxy_final"] for r in rows])
    red = {g: np.array([r["reduction_bp"][g] for r in rows]) for g in rows[0]["reduction_bp"]}
    red_eq = {g: np.array([r["reduction_eq_bp"][g] for r in rows]) for g in rows[0]["reduction_eq_bp"]}
    rho = np.array([r["leakage"] for r in rows])
    eps = np.array([r["proxy_gap"] for r in rows])
    q = lambda x: f"{np.median(x):.3f} (p10 {np.percentile(x, 10):.3f}, p90 {np.percentile(x, 90):.3f})"  # noqa: E731
    lines = [
        "# Hypergradient fidelity (docs/FORMULAS.md §7)",
        "",
        f"requests: {len(rows)}; edited layers: {list(layers)}; η = {eta}",
        "",
        f"- cos(g_proxy, g_exact): median {q(cos)}; share ≥ 0.9: {np.mean(cos >= 0.9):.1%}; "
        f"share > 0 (descent direction): {np.mean(cos > 0):.1%}",
        f"- cos(g_final, g_exact) (earlier layers' share of the gap): median {q(cos_fe)}",
        f"- cos(g_proxy, g_final) (final layer's linearisation point): median {q(cos_pf)}",
        f"- leakage ρ: median {q(rho)}",
        f"- proxy gap ε: median {q(eps)}",
        "",
        "| gradient | median reduction of F (bp), same η | share reduced | median reduction (bp), equal step length | share reduced |",
        "|---|---:|---:|---:|---:|",
    ]
    for g, v in red.items():
        e = red_eq[g]
        lines.append(f"| {g} | {np.median(v):.1f} | {np.mean(v > 0):.1%} | {np.median(e):.1f} | {np.mean(e > 0):.1%} |")
    lines += ["", "seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()), ""]
    return "\n".join(lines)


def plots(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cos = np.array([r["cos"] for r in rows])
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(cos, bins=20, range=(min(-1.0, cos.min()), 1.0))
    ax.set_xlabel("cos(g_proxy, g_exact)")
    ax.set_ylabel("requests")
    fig.tight_layout()
    fig.savefig(out / "hypergrad_cos.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for g in rows[0]["reduction_bp"]:
        ax.hist([r["reduction_bp"][g] for r in rows], bins=20, alpha=0.5, label=g)
    ax.set_xlabel("one-step reduction of F (bp)")
    ax.set_ylabel("requests")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "hypergrad_reduction.png", dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from metake_jax.batch import EditBatch, prepare_batch
    from metake_jax.experiment import prepare
    from metake_jax.hypergrad import GRADIENTS, diagnostics
    from metake_jax.targets import optimize_targets
    from launch._common import checked_config, setup_logging

    checked_config(argv, _CONFIG.value)
    setup_logging()

    c = _CONFIG.value
    t0 = time.perf_counter()
    s = prepare(c)
    n = min(_N.value, len(s.cases))
    reqs = [x.request for x in s.cases[:n]]
    hb, n = prepare_batch(s.tokenizer, reqs, s.templates)
    b = EditBatch(*map(jnp.asarray, hb))
    ec = s.edit_config
    mcfg = ec.metake or s.config.metake  # the config's metake section also for a non-MetaKE method
    eta = float(_ETA.value if _ETA.value is not None else mcfg.lr)
    seconds = {"setup": time.perf_counter() - t0}
    t = time.perf_counter()
    Z0 = jax.block_until_ready(optimize_targets(s.cfg, s.params, b, s.layers[-1], ec.stage1).Z)
    seconds["stage1"] = time.perf_counter() - t
    t = time.perf_counter()
    d = jax.block_until_ready(diagnostics(s.cfg, s.params, b, Z0, Z0, s.layers, s.stats(), ec.editor, mcfg, eta))
    seconds["diagnostics"] = time.perf_counter() - t
    cos, red, red_eq = np.asarray(d.cos), np.asarray(d.reduction_bp), np.asarray(d.reduction_eq_bp)
    cos_fe, cos_pf = np.asarray(d.cos_final_exact), np.asarray(d.cos_proxy_final)
    rho, eps, F0 = np.asarray(d.leakage), np.asarray(d.proxy_gap), np.asarray(d.F0)
    rows = [{
        "case_id": reqs[i].case_id, "cos": float(cos[i]), "cos_final_exact": float(cos_fe[i]),
        "cos_proxy_final": float(cos_pf[i]), "F0": float(F0[i]),
        "reduction_bp": {g: float(red[k, i]) for k, g in enumerate(GRADIENTS)},
        "reduction_eq_bp": {g: float(red_eq[k, i]) for k, g in enumerate(GRADIENTS)},
        "leakage": float(rho[i]), "proxy_gap": float(eps[i]),
    } for i in range(n)]
    out = Path(_OUT.value or Path(c.run_dir) / "hypergrad").expanduser()
    out.mkdir(parents=True, exist_ok=True)
    md = summarize(rows, eta, s.layers, seconds)
    (out / "hypergrad.json").write_text(json.dumps(
        {"eta": eta, "anchor": mcfg.anchor, "layers": list(s.layers), "model": str(c.model), "seconds": seconds,
         "requests": rows},
        indent=1))
    (out / "hypergrad.md").write_text(md)
    plots(rows, out)
    print(md)
    print(f"written to {out}")


if __name__ == "__main__":
    from launch._common import run_cli

    run_cli(main)
