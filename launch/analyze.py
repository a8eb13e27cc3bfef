"""The paper's analyses (docs/FORMULAS.md §10): Fig. 4, Fig. 5, Table 3, Fig. 7.

    python launch/analyze.py --config=configs/smollm2_cf.py --analysis=gamma --analysis=shift \
        --methods=memit,alphaedit,metake --n=50 --batch_size=25 --out=runs/analysis

``--analysis`` (repeatable; ``all`` = every one):

* ``gamma``  (Fig. 4): a sequential stream per method of ``--methods``; per batch, before the write,
  the association β_i at the final edited layer with that batch's C_p, and after the batch's full
  multi-layer write the realized γ_i = ⟨r̂_i, r_i⟩/(‖r_i‖² + ε) of the targets actually written;
  ``--bins`` quantile bins of β, mean γ ± standard error, per-request points, α = β/(1+β).
  With ``--runs=<dir>,...`` it reads the β, γ that finished ``launch/edit.py --config.eval.association=True``
  runs logged (from their results.json; pooled per method, e.g. over seeds) and runs no stream::

      python launch/analyze.py --analysis=gamma --runs=runs/cf200_memit_s0,runs/cf200_alphaedit_s0,runs/cf200_metake_s0
* ``kl``     (Fig. 5): Stage I λ_KL over ``--kl_grid`` for ``--kl_method``; Efficacy on the final
  model for the low-β (bottom ``--kl_frac``) and high-β (top) requests (β from the stream at the
  grid point nearest the config's λ_KL); per-group argmax λ (ties → smaller λ).
* ``sensitivity`` (Table 3): MetaKE over ``--t_grid`` × ``--eta_grid``; Eff/Gen/Spe on the final
  model; the first batch's Stage I Z⁰ is computed once and reused by every (T, η) (later batches'
  Z⁰ depend on the weights edited by earlier batches, so they are recomputed per grid point).
  A T = 0 row (the AlphaEdit write of Z⁰) is the reference.
* ``shift``  (Fig. 7): final-layer last-token hidden states of ``--n_queries`` factual queries
  (``--queries``, default ../shared/data/known_1000.json, else the cases' own prompts) before and
  after each method's stream: 2-D PCA plot, mean relative shift and RBF-kernel MMD² (median heuristic).

Each analysis writes ``<name>.json``, ``<name>.png`` and ``<name>.md`` into ``--out`` (default
``<run_dir>/analysis``) and prints the markdown; the sizes used are printed, with a note where one
is below the paper's.  Streams are shared between analyses of one invocation (same method, same λ_KL).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

ANALYSES = ("gamma", "shift", "kl", "sensitivity")  # run in this order: shift reuses the gamma streams
_CONFIG = config_flags.DEFINE_config_file("config", None, "Model/dataset config (configs/*.py).")
_ANALYSIS = flags.DEFINE_multi_enum("analysis", ["gamma"], ANALYSES + ("all",), "Analyses to run (repeatable).")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: <run_dir>/analysis).")
_N = flags.DEFINE_integer("n", None, "Number of cases edited (default: all the config selects).")
_BS = flags.DEFINE_integer("batch_size", None, "Requests per sequential batch (default: config.batch_size).")
_METHODS = flags.DEFINE_list("methods", ["memit", "alphaedit", "metake"], "Methods for gamma / shift.")
_BINS = flags.DEFINE_integer("bins", 13, "Quantile bins of β (paper: 13).")
_RUNS = flags.DEFINE_list("runs", None, "gamma only: run directories of `launch/edit.py --config.eval.association=True` "
                          "(results.json, per-batch entries); β, γ are read from them (pooled per method over the "
                          "runs, e.g. seeds) instead of running streams; no --config needed.")
_KL_GRID = flags.DEFINE_list("kl_grid", None, "Stage I λ_KL values (default: config λ_KL × 1/4, 1/2, 1, 2, 4).")
_KL_METHOD = flags.DEFINE_string("kl_method", None, "Method of the KL sweep (default: config.method).")
_KL_FRAC = flags.DEFINE_float("kl_frac", 0.2, "Fraction of requests in each β group (paper: 0.2).")
_T_GRID = flags.DEFINE_list("t_grid", ["5", "10", "15", "20"], "MetaKE look-ahead steps T (paper: 5,10,15,20).")
_ETA_GRID = flags.DEFINE_list("eta_grid", None, "MetaKE step sizes η (default: config η × 1/4, 1/2, 1, 2).")
_N_QUERIES = flags.DEFINE_integer("n_queries", 1000, "Factual queries for the hidden-state shift (paper: ≥ 1000).")
_QUERIES = flags.DEFINE_string("queries", None, "JSON list of records with a 'prompt' field "
                               "(default: ../shared/data/known_1000.json when present, else the cases' prompts).")

# The paper's sizes (docs/FORMULAS.md §9, §10).
PAPER = {"cases": 2000, "batch_size": 100, "gamma_requests": 500, "queries": 1000, "bins": 13}


def _fmt(x: Any, p: int = 3) -> str:
    return "–" if x is None else (f"{x:.{p}f}" if isinstance(x, float) else str(x))


class Context:
    """Model, statistics, cases and the streams already run (shared between analyses)."""

    def __init__(self, c: Any, out: Path) -> None:
        from metake_jax.experiment import prepare

        t = time.perf_counter()
        self.c, self.out = c, out
        self.s = prepare(c)
        n = _N.value or len(self.s.cases)
        self.cases = self.s.cases[:n]
        self.kind = self.cases[0].kind
        self.bs = int(_BS.value or self.s.config.batch_size)
        self.batches = [self.cases[i:i + self.bs] for i in range(0, len(self.cases), self.bs)]
        self.streams: dict[tuple[str, float], Any] = {}
        self.pre_argmax = None
        if self.kind == "zsre":
            from metake_jax.evaluate import neighborhood_argmax

            self.pre_argmax = neighborhood_argmax(self.s.cfg, self.s.params, self.s.tokenizer, self.cases,
                                                  batch_size=self.s.config.eval.batch_size)
        self.setup_s = time.perf_counter() - t

    def sizes(self) -> list[str]:
        n, nb = len(self.cases), len(self.batches)
        line = f"sizes: {n} {self.kind} cases in {nb} sequential batch(es) of ≤ {self.bs}"
        notes = [line + f" (paper: {PAPER['cases']} in batches of {PAPER['batch_size']})"]
        if n < PAPER["cases"] or self.bs != PAPER["batch_size"]:
            notes.append("note: the stream is smaller than the paper's")
        return notes

    def edit_config(self, method: str, kl: float | None = None):
        from metake_jax.runner import edit_config

        rc = dataclasses.replace(self.s.config, method=method)
        if kl is not None:
            rc = dataclasses.replace(rc, stage1=dataclasses.replace(rc.stage1, kl_factor=float(kl)))
        return edit_config(rc)

    def stream(self, method: str, kl: float | None = None):
        """The measured stream of ``method`` (cached per (method, λ_KL))."""
        from metake_jax.analysis import measure_stream

        ecfg = self.edit_config(method, kl)
        key = (method, float(ecfg.stage1.kl_factor))
        if key not in self.streams:
            reqs = [[x.request for x in b] for b in self.batches]
            logging.info("stream %s (λ_KL %g): %d batches of <= %d", method, key[1], len(reqs), self.bs)
            self.streams[key] = measure_stream(self.s.cfg, self.s.state(), self.s.tokenizer, reqs,
                                               self.s.templates, ecfg, n_pad=self.bs)
            logging.info("stream %s done in %.1f s", method, self.streams[key].seconds)
        return self.streams[key]

    def evaluate(self, params: Any) -> dict[str, Any]:
        from metake_jax.runner import evaluate_cases

        return evaluate_cases(self.s.config, self.kind, self.s.cfg, params, self.s.tokenizer, self.cases,
                              pre_argmax=self.pre_argmax)

    def write(self, name: str, data: dict[str, Any], md: str, fig: Any) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"{name}.json").write_text(json.dumps(data, indent=1, default=_json_default))
        (self.out / f"{name}.md").write_text(md + "\n")
        fig.tight_layout()
        fig.savefig(self.out / f"{name}.png", dpi=110)
        import matplotlib.pyplot as plt

        plt.close(fig)
        print(md + "\n", flush=True)


class RunsContext:
    """``--runs``: the β, γ that finished runs logged per request (``eval.association``), as streams per method."""

    def __init__(self, dirs: list[str], out: Path) -> None:
        import numpy as np

        from launch._common import fail
        from metake_jax.analysis import StreamMeasure

        t = time.perf_counter()
        self.out, self.streams, self.kinds, self.runs = out, {}, set(), {}
        pooled: dict[str, dict[str, list]] = {}
        for d in dirs:
            res_path = Path(d) / "results.json"
            if not res_path.is_file():
                fail(f"--runs: {d} has no results.json (a finished launch/edit.py run)")
            res = json.loads(res_path.read_text())
            m = str(res["method"])
            self.kinds.add(str(res.get("kind")))
            p = pooled.setdefault(m, {"case_ids": [], "beta": [], "gamma": [], "planned_norm": []})
            self.runs.setdefault(m, []).append(d)
            for e in res.get("batches", []):
                if "beta" not in e or "gamma" not in e:
                    fail(f"--runs: {res_path} batch {e.get('batch')} has no beta/gamma: "
                         "rerun with --config.eval.association=True")
                p["case_ids"] += [f"{d}:{c}" for c in e["case_ids"]]
                for k in ("beta", "gamma", "planned_norm"):
                    p[k] += e[k]
        for m, p in pooled.items():
            self.streams[m] = StreamMeasure(state=None, case_ids=p["case_ids"], beta=np.asarray(p["beta"], float),
                                            gamma=np.asarray(p["gamma"], float),
                                            planned_norm=np.asarray(p["planned_norm"], float), seconds=0.0)
        self.methods = list(pooled)
        self.cases = max(self.streams.values(), key=lambda st: len(st.beta)).case_ids
        self.setup_s = time.perf_counter() - t

    def stream(self, method: str, kl: float | None = None):
        return self.streams[method]

    def sizes(self) -> list[str]:
        lines = [f"sizes: β, γ logged by finished runs ({'/'.join(sorted(self.kinds))}), pooled per method:"]
        lines += [f"- {m}: {len(self.streams[m].beta)} requests from {', '.join(self.runs[m])}" for m in self.methods]
        return lines

    write = Context.write


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------- Fig. 4


def run_gamma(ctx: Context) -> None:
    """Fig. 4: β, γ per request of each ``--methods`` stream; bins, SE band, α curve → gamma.{json,png,md}."""
    import numpy as np

    from metake_jax.analysis import attenuation, quantile_bins

    t0 = time.perf_counter()
    methods = list(getattr(ctx, "methods", None) or _METHODS.value)  # --runs: the runs' methods
    data, rows = {"methods": {}, "bins": _BINS.value}, []
    plt = _plt()
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.6), sharey=True, squeeze=False)
    for ax, m in zip(axes[0], methods):
        st = ctx.stream(m)
        nb = min(_BINS.value, len(st.beta))
        b = quantile_bins(st.beta, st.gamma, nb)
        alpha = attenuation(st.beta)
        data["methods"][m] = {"case_ids": st.case_ids, "beta": st.beta, "gamma": st.gamma, "alpha": alpha,
                              "planned_norm": st.planned_norm, "bins": b, "seconds": st.seconds}
        rows.append((m, len(st.beta), np.median(st.beta), np.mean(st.gamma), np.mean(alpha),
                     np.mean(np.abs(st.gamma - alpha)), np.corrcoef(st.beta, st.gamma)[0, 1] if len(st.beta) > 2
                     else float("nan"), st.seconds))
        ax.scatter(st.beta, st.gamma, s=6, alpha=0.35, label="requests")
        ax.plot(b["x_mean"], b["y_mean"], "o-", color="C1", label=f"{nb}-bin mean γ")
        se = np.nan_to_num(b["y_se"])
        ax.fill_between(b["x_mean"], b["y_mean"] - se, b["y_mean"] + se, color="C1", alpha=0.3, label="± SE")
        xs = np.geomspace(max(st.beta.min(), 1e-6), max(st.beta.max(), 1e-5), 200)
        ax.plot(xs, attenuation(xs), "k--", label="α = β/(1+β)")
        ax.set_xscale("log")
        ax.set_xlabel("association β (final edited layer)")
        ax.set_title(m)
    axes[0][0].set_ylabel("realized γ")
    axes[0][0].legend(fontsize=7)
    sizes = ctx.sizes()
    n_req = len(ctx.cases)
    if n_req < PAPER["gamma_requests"]:
        sizes.append(f"note: {n_req} requests per method, below the paper's ≥ {PAPER['gamma_requests']}")
    if _BINS.value != PAPER["bins"]:
        sizes.append(f"note: {_BINS.value} bins (paper: {PAPER['bins']})")
    md = ["## Realized γ vs association β (docs/FORMULAS.md §10, Fig. 4)", "", *sizes, "",
          "| method | requests | median β | mean γ | mean α(β) | mean abs(γ − α) | corr(β, γ) | stream s |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {r[0]} | {r[1]} | " + " | ".join(_fmt(float(x)) for x in r[2:7]) + f" | {r[7]:.1f} |" for r in rows]
    md += ["", "Per bin (β̄ → γ̄ ± SE):", "", "| bin | " + " | ".join(methods) + " |", "|---:|" + "---|" * len(methods)]
    nbins = min(len(data["methods"][m]["bins"]["x_mean"]) for m in methods)
    for j in range(nbins):
        cells = []
        for m in methods:
            b = data["methods"][m]["bins"]
            cells.append(f"{b['x_mean'][j]:.3g} → {b['y_mean'][j]:.3f} ± {_fmt(float(b['y_se'][j]))}")
        md.append(f"| {j + 1} | " + " | ".join(cells) + " |")
    md += ["", f"analysis time {time.perf_counter() - t0:.1f} s (setup {ctx.setup_s:.1f} s)"]
    data["sizes"] = sizes
    ctx.write("gamma", data, "\n".join(md), fig)


# ----------------------------------------------------------------------------- Fig. 5


def run_kl(ctx: Context) -> None:
    """Fig. 5: Efficacy of the low-/high-β groups per Stage I λ_KL → kl_sweep.{json,png,md}."""
    import numpy as np

    from metake_jax.analysis import best_on_grid, extreme_groups
    from metake_jax.report import PER_CASE_KEYS

    t0 = time.perf_counter()
    method = _KL_METHOD.value or str(ctx.s.config.method)
    default = float(ctx.s.config.stage1.kl_factor)
    grid = sorted(float(x) for x in _KL_GRID.value) if _KL_GRID.value else [default * f for f in (0.25, 0.5, 1, 2, 4)]
    centre = min(grid, key=lambda g: abs(np.log(g / default)) if g > 0 else np.inf)
    key = PER_CASE_KEYS[ctx.kind]["efficacy"]
    ref = ctx.stream(method, centre)
    low, high = extreme_groups(ref.beta, _KL_FRAC.value)
    pos = {cid: i for i, cid in enumerate(ref.case_ids)}
    eff = {"low": [], "high": [], "all": []}
    for lam in grid:
        st = ctx.stream(method, lam)
        per = ctx.evaluate(st.state.params)["per_case"]
        v = np.full(len(pos), np.nan)
        for c in per:
            if c.get(key) is not None:
                v[pos[c["case_id"]]] = c[key]
        eff["low"].append(100 * float(np.nanmean(v[low])))
        eff["high"].append(100 * float(np.nanmean(v[high])))
        eff["all"].append(100 * float(np.nanmean(v)))
    best = {g: best_on_grid(grid, eff[g]) for g in ("low", "high")}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for g, lab in (("low", f"low β (bottom {_KL_FRAC.value:.0%})"), ("high", f"high β (top {_KL_FRAC.value:.0%})"),
                   ("all", "all")):
        ax.plot(grid, eff[g], "o-", label=lab)
    ax.axvline(default, color="k", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("Stage I λ_KL")
    ax.set_ylabel("Efficacy (×100)")
    ax.set_title(f"{method}: KL strength vs association")
    ax.legend(fontsize=8)
    sizes = ctx.sizes() + [f"groups: {len(low)} low-β and {len(high)} high-β requests "
                           f"(β from the λ_KL = {centre:g} stream); grid {grid}"]
    md = ["## KL strength vs association (docs/FORMULAS.md §10, Fig. 5)", "", *sizes, "",
          "| λ_KL | Eff low β | Eff high β | Eff all |", "|---:|---:|---:|---:|"]
    md += [f"| {lam:g}{' (default)' if lam == default else ''} | {a:.1f} | {b:.1f} | {c:.1f} |"
           for lam, a, b, c in zip(grid, eff["low"], eff["high"], eff["all"])]
    md += ["", f"argmax λ_KL (ties → smaller): low β {best['low']:g}, high β {best['high']:g}", "",
           f"analysis time {time.perf_counter() - t0:.1f} s"]
    data = {"method": method, "grid": grid, "default": default, "centre": centre, "efficacy": eff, "best": best,
            "low_case_ids": [ref.case_ids[i] for i in low], "high_case_ids": [ref.case_ids[i] for i in high],
            "beta": ref.beta, "case_ids": ref.case_ids, "sizes": sizes}
    ctx.write("kl_sweep", data, "\n".join(md), fig)


# ----------------------------------------------------------------------------- Table 3


def run_sensitivity(ctx: Context) -> None:
    """Table 3: Eff/Gen/Spe of MetaKE over T × η (batch 1's Z⁰ shared) → sensitivity.{json,png,md}."""
    import jax.numpy as jnp
    import numpy as np

    from metake_jax.analysis import solve_scope
    from metake_jax.batch import EditBatch, prepare_batch
    from metake_jax.editor import compute_targets, look_rows, write_targets
    from metake_jax.metake import refine_targets

    t0 = time.perf_counter()
    method = str(ctx.s.config.method) if str(ctx.s.config.method) in ("metake", "metake_memit", "metake_keyonly") else "metake"
    ecfg = ctx.edit_config(method)
    s1cfg = dataclasses.replace(ecfg, metake=None)
    eta0 = float(ecfg.metake.lr)
    Ts = [int(x) for x in _T_GRID.value]
    etas = [float(x) for x in _ETA_GRID.value] if _ETA_GRID.value else [eta0 * f for f in (0.25, 0.5, 1, 2)]
    s = ctx.s
    prepared = []
    for b in ctx.batches:
        host, n = prepare_batch(s.tokenizer, [x.request for x in b], s.templates, n_pad=ctx.bs)
        prepared.append((EditBatch(*[jnp.asarray(x) for x in host]), look_rows(host, ecfg.metake)))
    timings: dict[str, float] = {}
    Z0_first, _, _ = compute_targets(s.cfg, s.state(), prepared[0][0], s1cfg, timings)

    def run(T: int, eta: float) -> dict[str, Any]:
        t = time.perf_counter()
        state = s.state()
        mcfg = dataclasses.replace(ecfg.metake, steps=T, lr=eta) if T > 0 else None
        for j, (batch, lb) in enumerate(prepared):
            Z = Z0_first if j == 0 else compute_targets(s.cfg, state, batch, s1cfg, {})[0]
            if mcfg is not None:
                with solve_scope(ecfg.editor):
                    Z = refine_targets(s.cfg, state.params, batch, Z, ecfg.layers, state.stats, ecfg.editor, mcfg, lb).Z
            state, _ = write_targets(s.cfg, state, batch, Z, ecfg, {})
        summ = ctx.evaluate(state.params)["summary"]
        return {"T": T, "eta": eta, "efficacy": summ.get("efficacy"), "generalization": summ.get("generalization"),
                "specificity": summ.get("specificity"), "seconds": time.perf_counter() - t}

    rows = [run(0, 0.0)] + [run(T, eta) for T in Ts for eta in etas]
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, k in zip(axes, ("efficacy", "generalization", "specificity")):
        grid = np.array([[next(r[k] for r in rows if r["T"] == T and r["eta"] == e) for e in etas] for T in Ts],
                        dtype=float)
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(etas)), [f"{e:g}" for e in etas])
        ax.set_yticks(range(len(Ts)), [str(T) for T in Ts])
        for i in range(len(Ts)):
            for j in range(len(etas)):
                ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", color="w", fontsize=8)
        ax.set_xlabel("η")
        ax.set_ylabel("T")
        ax.set_title(f"{k} (T=0: {rows[0][k]:.1f})")
        fig.colorbar(im, ax=ax)
    sizes = ctx.sizes() + [f"grid: T ∈ {Ts} × η ∈ {etas} (paper: T ∈ 5,10,15,20 × four η); method {method}; "
                           f"batch 1's Stage I Z⁰ computed once ({timings.get('stage1', 0):.1f} s) and reused"
                           + ("; later batches' Z⁰ recomputed per grid point" if len(prepared) > 1 else "")]
    md = ["## Sensitivity to T and η (docs/FORMULAS.md §10, Table 3)", "", *sizes, "",
          "| T | η | Eff | Gen | Spe | s |", "|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {r['T']} | {'–' if r['T'] == 0 else format(r['eta'], 'g')} | {_fmt(r['efficacy'], 1)} | "
           f"{_fmt(r['generalization'], 1)} | {_fmt(r['specificity'], 1)} | {r['seconds']:.1f} |" for r in rows]
    md += ["", "T = 0 is the AlphaEdit write of the Stage I targets (w/o bi-level).", "",
           f"analysis time {time.perf_counter() - t0:.1f} s"]
    ctx.write("sensitivity", {"method": method, "T_grid": Ts, "eta_grid": etas, "rows": rows, "sizes": sizes},
              "\n".join(md), fig)


# ----------------------------------------------------------------------------- Fig. 7


def _queries(ctx: Context) -> tuple[list[str], str]:
    """(prompts, where they came from); a missing explicit ``--queries`` file is a UsageError."""
    from configs.base import data_path

    path = Path(_QUERIES.value or data_path("known_1000.json")).expanduser()
    if path.is_file():
        recs = json.loads(path.read_text())
        prompts = [r["prompt"] for r in recs if isinstance(r, dict) and r.get("prompt")]
        return prompts[:_N_QUERIES.value], str(path)
    if _QUERIES.value:
        raise FileNotFoundError(f"--queries={_QUERIES.value}: file not found")
    prompts = []
    for c in ctx.cases:
        prompts += [c.request.text, *c.paraphrase_prompts, *c.neighborhood_prompts]
    return prompts[:_N_QUERIES.value], "the cases' own prompts (known_1000.json not found)"


def run_shift(ctx: Context) -> None:
    """Fig. 7: hidden states (n_query, d_model) before/after each stream: PCA, shift, MMD² → shift.{json,png,md}."""
    import numpy as np

    from metake_jax.analysis import final_hidden, pca_2d, rbf_mmd2, relative_shift

    t0 = time.perf_counter()
    s = ctx.s
    prompts, source = _queries(ctx)
    H_pre = final_hidden(s.cfg, s.params, s.tokenizer, prompts)
    half = len(H_pre) // 2
    ref_mmd, _ = rbf_mmd2(H_pre[:half], H_pre[half:2 * half])
    methods = list(_METHODS.value)
    posts, rows, data = [], [], {"source": source, "n_queries": len(prompts), "methods": {},
                                 "pre_split_half_mmd2": ref_mmd}
    for m in methods:
        st = ctx.stream(m)
        H_post = final_hidden(s.cfg, st.state.params, s.tokenizer, prompts)
        rel = relative_shift(H_pre, H_post)
        mmd, sigma = rbf_mmd2(H_pre, H_post)
        posts.append(H_post)
        data["methods"][m] = {"mean_rel_shift": float(rel.mean()), "median_rel_shift": float(np.median(rel)),
                              "max_rel_shift": float(rel.max()), "mmd2": mmd, "sigma": sigma}
        rows.append((m, float(rel.mean()), float(np.median(rel)), float(rel.max()), mmd, sigma))
    proj, ratio = pca_2d(H_pre, *posts)
    plt = _plt()
    fig, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 3.6), sharex=True, sharey=True, squeeze=False)
    for ax, m, p in zip(axes[0], methods, proj[1:]):
        ax.scatter(proj[0][:, 0], proj[0][:, 1], s=4, c="0.6", alpha=0.5, label="pre-edit")
        ax.scatter(p[:, 0], p[:, 1], s=4, c="C3", alpha=0.5, label="post-edit")
        ax.set_title(f"{m}: MMD² {data['methods'][m]['mmd2']:.2e}")
        ax.set_xlabel(f"PC1 ({ratio[0]:.0%})")
    axes[0][0].set_ylabel(f"PC2 ({ratio[1]:.0%})")
    axes[0][0].legend(fontsize=7, markerscale=3)
    sizes = ctx.sizes() + [f"queries: {len(prompts)} from {source}"]
    if len(prompts) < PAPER["queries"]:
        sizes.append(f"note: {len(prompts)} queries, below the paper's ≥ {PAPER['queries']}")
    md = ["## Hidden-state shift (docs/FORMULAS.md §10, Fig. 7)", "", *sizes, "",
          "Final-layer block output at the last token; shift = ‖h_post − h_pre‖/‖h_pre‖; MMD² biased, RBF kernel, "
          "σ = median pairwise distance of the pooled set.", "",
          "| method | mean shift | median shift | max shift | MMD² | σ |", "|---|---:|---:|---:|---:|---:|"]
    md += [f"| {r[0]} | {r[1]:.4f} | {r[2]:.4f} | {r[3]:.4f} | {r[4]:.3e} | {r[5]:.2f} |" for r in rows]
    md += ["", f"reference: MMD² between two halves of the pre-edit set = {ref_mmd:.3e}", "",
           f"analysis time {time.perf_counter() - t0:.1f} s (streams shared with other analyses are counted "
           "where they first ran)"]
    data["sizes"] = sizes
    ctx.write("shift", data, "\n".join(md), fig)


RUNNERS = {"gamma": run_gamma, "kl": run_kl, "sensitivity": run_sensitivity, "shift": run_shift}


def main(argv: list[str]) -> None:
    from launch._common import checked_config, setup_logging

    chosen = ANALYSES if "all" in _ANALYSIS.value else tuple(a for a in ANALYSES if a in _ANALYSIS.value)
    if _RUNS.value:
        from launch._common import fail

        if chosen != ("gamma",):
            fail(f"--runs: only --analysis=gamma reads finished runs (got {','.join(chosen)})")
        setup_logging()
        out = Path(_OUT.value or Path(_RUNS.value[0]) / "analysis").expanduser()
        ctx = RunsContext(list(_RUNS.value), out)
        run_gamma(ctx)
        print(f"outputs in {out}")
        return
    c = checked_config(argv, _CONFIG.value)
    setup_logging()
    from metake_jax.runner import METHODS

    unknown = [m for m in _METHODS.value if m not in METHODS]
    if unknown:
        from launch._common import fail

        fail(f"--methods: unknown {unknown} (one of {', '.join(METHODS)})")
    out = Path(_OUT.value or Path(str(c.run_dir)) / "analysis").expanduser()
    t0 = time.perf_counter()
    ctx = Context(c, out)
    for a in chosen:
        RUNNERS[a](ctx)
    print(f"outputs in {out} ({time.perf_counter() - t0:.1f} s in all)")


if __name__ == "__main__":
    from launch._common import run_cli

    run_cli(main)
