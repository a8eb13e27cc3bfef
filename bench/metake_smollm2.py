"""MetaKE on SmolLM2: η grid on one batch, then the sequential method table (paper Table 2 style).

    python bench/metake_smollm2.py grid  --n 20 --etas 0.05,0.2,0.5,1,2
    python bench/metake_smollm2.py table --n 100 --batch 20 --eta 0.5 \
        --methods alphaedit,metake,metake_keyonly,metake_stopgrad,metake_ungated
    python bench/metake_smollm2.py grid  --n 50 --etas 0.003 --anchors 1,100,10,0.1 --T 15 --prompts bare \
        --out runs/anchor_sweep_n50.json     # per-case metrics saved for intervals
    python bench/metake_smollm2.py intervals --out runs/anchor_sweep_n50.json   # paired 95 % intervals vs AlphaEdit
    python bench/metake_smollm2.py table --n 100 --methods unedited   # the pre-edit reference row

Data: the first n cases of ../shared/data/counterfact_easyedit/counterfact-edit.json when present,
else the bundled demo set. ``metake_nobilevel`` (T = 0) is AlphaEdit exactly (tests prove the weights
are identical), so the table reuses the AlphaEdit row for it.
Prints figures and writes a JSON next to the run dir; copy the tables into bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np

from configs import smollm2_cf
from metake_jax.batch import EditBatch, prepare_batch
from metake_jax.editor import edit_batch, look_rows, write_targets
from metake_jax.evaluate.counterfact import evaluate_counterfact
from metake_jax.experiment import prepare
from metake_jax.metake import MetaKEConfig, refine_targets
from metake_jax.targets import optimize_targets
from metake_jax.editors.alphaedit import AlphaEdit

CF = ROOT.parent / "shared" / "data" / "counterfact_easyedit" / "counterfact-edit.json"

VARIANTS = {
    "metake": dict(),
    "metake_keyonly": dict(gate="keyonly"),
    "metake_stopgrad": dict(feedback="stopgrad"),
    "metake_ungated": dict(feedback="ungated"),
}


def config(n: int, batch: int):
    c = smollm2_cf.get_config()
    if CF.is_file():
        c.data.path = str(CF)
        c.data.format = "flat"
    c.data.n = n
    c.batch_size = batch
    c.run_dir = "runs/bench_metake_smollm2"
    return c


PER_CASE = ("rewrite_success", "paraphrase_success", "neighborhood_success",
            "rewrite_magnitude", "paraphrase_magnitude", "neighborhood_magnitude")


def metrics(s, params, cases, per_case: bool = False) -> dict:
    ev = evaluate_counterfact(s.cfg, params, s.tokenizer, cases, batch_size=64)
    keys = ("efficacy", "generalization", "specificity", "score",
            "efficacy_magnitude", "generalization_magnitude", "specificity_magnitude")
    out = {k: ev["summary"].get(k) for k in keys}
    if per_case:  # for paired intervals (docs/FORMULAS.md §11): per-case values in case order
        out["per_case"] = {k: [c.get(k) for c in ev["per_case"]] for k in PER_CASE + ("case_id",)}
    return out


def stage1_targets(s, cases, b) -> jax.Array:
    """Stage I targets Z⁰ (d_model, n_pad) of ``cases``, cached in /tmp keyed by everything that
    determines them (model, case ids, templates, Stage I config, layers): the expensive part."""
    ec = s.edit_config
    key = json.dumps([s.model_id, [x.case_id for x in cases], s.templates, dataclasses.asdict(ec.stage1),
                      list(s.layers)], default=str)
    cache = Path(f"/tmp/metake_smollm2_z0_{hashlib.sha1(key.encode()).hexdigest()[:16]}.npy")
    if cache.is_file():
        return jnp.asarray(np.load(cache))
    t = time.perf_counter()
    Z0 = jax.block_until_ready(optimize_targets(s.cfg, s.params, b, s.layers[-1], ec.stage1).Z)
    print(f"stage1 {time.perf_counter() - t:.1f}s", flush=True)
    np.save(cache, np.asarray(Z0))
    return Z0


def grid(a) -> None:
    s = prepare(config(a.n, a.n))
    cases = s.cases[: a.n]
    reqs = [x.request for x in cases]
    hb, n = prepare_batch(s.tokenizer, reqs, s.templates)
    b = EditBatch(*map(jnp.asarray, hb))
    ec = s.edit_config
    Z0 = stage1_targets(s, cases, b)
    out = {"pre": metrics(s, s.params, cases, True)}
    print("pre", {k: v for k, v in out["pre"].items() if k != "per_case"}, flush=True)
    state = s.state()
    timings: dict = {}
    st, _ = write_targets(s.cfg, state, b, Z0, dataclasses.replace(ec, metake=None), timings)
    out["alphaedit"] = metrics(s, st.params, cases, True)
    print("alphaedit", {k: v for k, v in out["alphaedit"].items() if k != "per_case"}, timings, flush=True)
    combos = [(p, float(e), float(w)) for p in a.prompts.split(",") for e in a.etas.split(",")
              for w in a.anchors.split(",")]
    if a.pairs:  # explicit eta:anchor pairs
        combos = [(a.prompts.split(",")[0], float(x.split(":")[0]), float(x.split(":")[1]))
                  for x in a.pairs.split(",")]
    for prompts, eta, anchor in combos:
        if True:
            for name in a.variants.split(","):
                mc = MetaKEConfig(steps=a.T, lr=eta, prompts=prompts, anchor_weight=anchor, anchor=a.anchor_mode,
                                  **VARIANTS[name])
                lb = look_rows(hb, mc)
                t = time.perf_counter()
                r = jax.block_until_ready(refine_targets(s.cfg, s.params, b, Z0, s.layers, state.stats,
                                                         ec.editor, mc, lb))
                dt = time.perf_counter() - t
                st, _ = write_targets(s.cfg, state, b, r.Z, dataclasses.replace(ec, metake=mc), {})
                key = f"{name}:{prompts}:eta={eta}:anchor={anchor}"
                curve = np.asarray(r.losses)[:, :n].mean(1)
                move = np.asarray(r.move)[:n]
                out[key] = {**metrics(s, st.params, cases, True), "lookahead_s": dt,
                            "meta_loss_curve": curve.tolist(),
                            "meta_loss_first": float(curve[0]), "meta_loss_last": float(curve[-1]),
                            "meta_loss_drop": float(1 - curve[-1] / curve[0]),
                            "move_rel_median": float(np.median(move)),  # ‖z − z⁰‖ / ‖r⁰‖ per request
                            "move_rel_p90": float(np.percentile(move, 90)),
                            "accepted_eta_mean": float(np.asarray(r.step_sizes)[:, :n].mean()),
                            "dZ_rel": float(jnp.linalg.norm(r.Z - Z0) / jnp.linalg.norm(Z0))}
                print(key, {k: v for k, v in out[key].items() if k != "per_case"}, flush=True)
                Path(a.out).write_text(json.dumps(out, indent=1))
    Path(a.out).write_text(json.dumps(out, indent=1))


def table(a) -> None:
    s = prepare(config(a.n, a.batch))
    cases = s.cases[: a.n]
    out = {"n": len(cases), "batch": a.batch, "eta": a.eta, "T": a.T, "prompts": a.prompts, "anchor": a.anchor}
    for method in a.methods.split(","):
        if method == "unedited":  # the pre-edit model: the reference point of every metric
            out[method] = metrics(s, s.params, cases)
            print(method, out[method], flush=True)
            Path(a.out).write_text(json.dumps(out, indent=1))
            continue
        ec = s.edit_config
        if method == "alphaedit":
            ec = dataclasses.replace(ec, metake=None, editor=AlphaEdit(l2=ec.editor.l2))
        else:
            ec = dataclasses.replace(ec, metake=MetaKEConfig(steps=a.T, lr=a.eta, prompts=a.prompts,
                                                             anchor_weight=a.anchor, anchor=a.anchor_mode,
                                                             **VARIANTS[method]))
        state = s.state()
        times = []
        for i in range(0, len(cases), a.batch):
            chunk = [x.request for x in cases[i:i + a.batch]]
            state, rep = edit_batch(s.cfg, state, s.tokenizer, chunk, s.templates, ec, n_pad=a.batch)
            times.append(rep.timings)
            print(method, i, {k: round(v, 1) for k, v in rep.timings.items()}, flush=True)
        m = metrics(s, state.params, cases, True)
        steady = times[1:] or times
        out[method] = {**m, "batch_seconds": [t["total"] for t in times],
                       "mean_batch_s_after_first": float(np.mean([t["total"] for t in steady])),
                       "phases_after_first": {k: float(np.mean([t.get(k, 0.0) for t in steady]))
                                              for k in ("stage1", "lookahead", "write", "cache")}}
        print(method, {k: v for k, v in out[method].items() if k != "per_case"}, flush=True)
        Path(a.out).write_text(json.dumps(out, indent=1))


def intervals(a) -> None:
    """Markdown table of a ``grid`` JSON: each row's Eff / Gen / Spe and magnitudes with the paired
    bootstrap 95 % interval of the per-case difference to AlphaEdit (docs/FORMULAS.md §11)."""
    from metake_jax.statistics import paired_bootstrap, verdict

    out = json.loads(Path(a.out).read_text())
    base = out["alphaedit"]["per_case"]
    cols = [("Eff", "rewrite_success", 100), ("Gen", "paraphrase_success", 100), ("Spe", "neighborhood_success", 100),
            ("Eff mag", "rewrite_magnitude", 100), ("Gen mag", "paraphrase_magnitude", 100),
            ("Spe mag", "neighborhood_magnitude", 100)]
    print("| row | ℓ_meta drop | median move | " + " | ".join(c[0] for c in cols) + " |")
    print("|---|---:|---:|" + "---|" * len(cols))
    for key, row in out.items():
        if not isinstance(row, dict) or "per_case" not in row:
            continue
        cells = []
        for _, field, unit in cols:
            x = np.asarray(row["per_case"][field], np.float64) * unit
            y = np.asarray(base[field], np.float64) * unit
            if key == "alphaedit" or key == "pre":
                cells.append(f"{x.mean():.2f}")
                continue
            d, lo, hi = paired_bootstrap(x, y, n_resamples=2000)
            cells.append(f"{x.mean():.2f} (Δ {d:+.2f} [{lo:+.2f}, {hi:+.2f}], {verdict(lo, hi)})")
        drop = f"{100 * row['meta_loss_drop']:.1f} %" if "meta_loss_drop" in row else ""
        move = f"{row['move_rel_median']:.3f}" if "move_rel_median" in row else ""
        print(f"| {key} | {drop} | {move} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["grid", "table", "intervals"])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--T", type=int, default=15)
    ap.add_argument("--eta", type=float, default=0.5)
    ap.add_argument("--etas", default="0.1,0.5,2.0")
    ap.add_argument("--variants", default="metake")
    ap.add_argument("--anchors", default="1.0")
    ap.add_argument("--anchor", type=float, default=1.0)
    ap.add_argument("--pairs", default="", help="explicit eta:anchor pairs, e.g. 0.5:1,10:0.01")
    ap.add_argument("--prompts", default="all")
    ap.add_argument("--anchor_mode", default="relative", choices=["relative", "absolute"])
    ap.add_argument("--methods", default="alphaedit,metake,metake_keyonly,metake_stopgrad,metake_ungated")
    ap.add_argument("--out", default="/tmp/metake_smollm2.json")
    a = ap.parse_args()
    {"grid": grid, "table": table, "intervals": intervals}[a.mode](a)


if __name__ == "__main__":
    main()
