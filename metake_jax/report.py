"""Human-readable outputs of a run: the pre/post markdown table and PNG plots (docs/FORMULAS.md §8–§9).

``results`` is the dict ``metake_jax.runner.run`` returns (and writes to results.json).
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PER_CASE_KEYS", "compare_table", "metrics_table", "paired_comparison", "paired_table", "write_plots",
           "write_results_md"]

_CF_ROWS = ("efficacy", "generalization", "specificity", "score", "fluency", "consistency",
            "efficacy_magnitude", "generalization_magnitude", "specificity_magnitude")
_ZSRE_ROWS = ("efficacy", "generalization", "specificity", "specificity_pre_edit")
_STAGES = ("prepare", "stage1", "lookahead", "write", "cache", "eval", "checkpoint")


def _fmt(x: Any) -> str:
    return "–" if x is None else (f"{x:.2f}" if isinstance(x, float) else str(x))


def metrics_table(results: dict[str, Any]) -> str:
    """Markdown table of pre- and post-edit metrics (×100)."""
    rows = _ZSRE_ROWS if results.get("kind") == "zsre" else _CF_ROWS
    pre, post = results.get("pre") or {}, results.get("post") or {}
    lines = ["| metric | pre-edit | post-edit |", "|---|---:|---:|"]
    for r in rows:
        if pre.get(r) is None and post.get(r) is None:
            continue
        lines.append(f"| {r} | {_fmt(pre.get(r))} | {_fmt(post.get(r))} |")
    return "\n".join(lines)


def compare_table(runs: list[dict[str, Any]], *, names: list[str] | None = None) -> str:
    """One markdown row per run (post-edit metrics ×100, pre-edit on a first row) — a method table.

    Columns follow the benchmark (CounterFact: Eff / Gen / Spe / Score + magnitudes; ZsRE: Eff /
    Gen / Spe) plus the median per-batch Stage I, look-ahead and total seconds after the first batch
    (the first one includes compilation).  All runs must be on the same benchmark and cases.
    """
    if not runs:
        raise ValueError("compare_table: no runs")
    kinds = {r.get("kind") for r in runs}
    if len(kinds) != 1:
        raise ValueError(f"compare_table: runs mix benchmarks {sorted(map(str, kinds))}")
    ncases = {r.get("n_cases") for r in runs}
    if len(ncases) != 1:
        raise ValueError(f"compare_table: runs have different numbers of cases {sorted(map(str, ncases))}")
    rows = _ZSRE_ROWS[:3] if kinds == {"zsre"} else tuple(
        r for r in _CF_ROWS if r not in ("fluency", "consistency"))
    names = names or [r["method"] for r in runs]
    head = ["method"] + list(rows) + ["stage1 s/batch", "look-ahead s/batch", "total s/batch"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    pre = runs[0].get("pre") or {}
    if pre:
        lines.append("| unedited | " + " | ".join(_fmt(pre.get(k)) for k in rows) + " | | | |")
    for name, r in zip(names, runs):
        post = r.get("post") or {}
        later = [b.get("timings", {}) for b in r.get("batches", [])[1:]]
        vals = [[t[k] for t in later if t.get(k) is not None] for k in ("stage1", "lookahead", "total")]
        med = [statistics.median(v) if v else None for v in vals]
        lines.append(f"| {name} | " + " | ".join(_fmt(post.get(k)) for k in rows) + " | "
                     + " | ".join(_fmt(m) for m in med) + " |")
    return "\n".join(lines)


#: Per-case keys of eval_post.json ``per_case`` behind each reported metric (docs/FORMULAS.md §8).
PER_CASE_KEYS: dict[str, dict[str, str]] = {
    "counterfact": {"efficacy": "rewrite_success", "generalization": "paraphrase_success",
                    "specificity": "neighborhood_success", "efficacy_magnitude": "rewrite_magnitude",
                    "generalization_magnitude": "paraphrase_magnitude",
                    "specificity_magnitude": "neighborhood_magnitude"},
    "zsre": {"efficacy": "rewrite_acc", "generalization": "paraphrase_acc", "specificity": "neighborhood_acc"},
}


def _seeds(run: dict[str, Any]) -> tuple[Any, Any]:
    cfg = run["results"].get("config") or {}
    return (cfg.get("data") or {}).get("seed"), (cfg.get("templates") or {}).get("seed")


def _group_runs(runs: list[dict[str, Any]]) -> dict[str, dict[Any, dict[str, Any]]]:
    """label → {data seed: run}.  The label is the method, plus the template seed when two runs of
    one method share a data seed (the noise-floor pair)."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_method.setdefault(r["results"]["method"], []).append(r)
    groups: dict[str, dict[Any, dict[str, Any]]] = {}
    for method, rs in by_method.items():
        data_seeds = [_seeds(r)[0] for r in rs]
        split = len(set(data_seeds)) < len(data_seeds)
        for r in rs:
            ds, ts = _seeds(r)
            label = f"{method} (templates seed {ts})" if split else method
            g = groups.setdefault(label, {})
            if ds in g:
                raise ValueError(f"{g[ds]['name']} and {r['name']} are both {label} on data seed {ds}")
            g[ds] = r
    return groups


def _per_case(run: dict[str, Any], key: str) -> dict[Any, float]:
    return {c["case_id"]: float(c[key]) for c in run["post"]["per_case"] if c.get(key) is not None}


def _pairs(ga: dict[Any, dict[str, Any]], gb: dict[Any, dict[str, Any]], key: str, la: str, lb: str
           ) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    seeds = [s for s in ga if s in gb]
    if not seeds:
        raise ValueError(f"{la} and {lb} share no data seed ({sorted(map(str, ga))} vs {sorted(map(str, gb))})")
    a, b = [], []
    for s in seeds:
        ia, ib = ga[s]["post"].get("case_ids"), gb[s]["post"].get("case_ids")
        if sorted(map(str, ia or [])) != sorted(map(str, ib or [])):
            raise ValueError(f"data seed {s}: {ga[s]['name']} and {gb[s]['name']} edited different cases "
                             "(same --config.data.n / data.seed / data.path?)")
        va, vb = _per_case(ga[s], key), _per_case(gb[s], key)
        common = [c for c in va if c in vb]
        a += [va[c] for c in common]
        b += [vb[c] for c in common]
    return np.asarray(a), np.asarray(b), seeds


def paired_comparison(runs: list[dict[str, Any]], *, baseline: str | None = None, n_resamples: int = 2000,
                      confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Paired statistics over run directories (docs/FORMULAS.md §11).

    ``runs``: dicts ``{"name": str, "results": results.json, "post": eval_post.json}``, made with
    ``--config.data.seed=S``.  Runs are grouped by :func:`_group_runs` labels; per group and metric
    (``PER_CASE_KEYS``): per-seed means ×100 and their mean ± std (ddof 1) over seeds.  Each group is
    compared with ``baseline`` (a label; default the first group) on the (data seed, case_id) pairs
    both have: the mean per-case difference ×100 and its paired bootstrap interval
    (``analysis.paired_bootstrap``), with a verdict.  Groups of one method under different template
    seeds are also compared with that method's first group ("noise floor").
    Raises ValueError (one line) for mixed benchmarks, an unknown baseline, runs without per-case
    metrics, shared seeds with different cases, or no shared seed.
    """
    from metake_jax.statistics import paired_bootstrap, verdict

    if not runs:
        raise ValueError("paired_comparison: no runs")
    kinds = {r["results"].get("kind") for r in runs}
    if len(kinds) != 1 or not kinds <= set(PER_CASE_KEYS):
        raise ValueError(f"runs mix benchmarks or have an unknown one: {sorted(map(str, kinds))}")
    keys = PER_CASE_KEYS[kinds.pop()]
    for r in runs:
        if not (r.get("post") or {}).get("per_case"):
            raise ValueError(f"{r['name']}: eval_post.json has no per_case metrics")
    groups = _group_runs(runs)
    labels = list(groups)
    base = baseline or labels[0]
    if base not in groups:
        raise ValueError(f"baseline {base!r} is not one of the groups {labels}")
    out: dict[str, Any] = {"baseline": base, "n_resamples": n_resamples, "confidence": confidence,
                           "groups": {}, "comparisons": []}
    for label, g in groups.items():
        metrics = {}
        for name, key in keys.items():
            per_seed = {str(s): 100 * float(np.mean(list(v.values())))
                        for s, r in g.items() if (v := _per_case(r, key))}
            vals = np.asarray(list(per_seed.values()))
            metrics[name] = {"per_seed": per_seed, "mean": float(vals.mean()) if vals.size else None,
                             "std": float(vals.std(ddof=1)) if vals.size > 1 else None}
        out["groups"][label] = {"runs": [r["name"] for r in g.values()], "data_seeds": [str(s) for s in g],
                                "metrics": metrics}
    noise, first_of = [], {}
    for label, g in groups.items():
        method = next(iter(g.values()))["results"]["method"]
        if method in first_of:
            noise.append((label, first_of[method], "noise floor"))
        first_of.setdefault(method, label)
    pairs = [(label, base, "method") for label in labels
             if label != base and (label, base, "noise floor") not in noise] + noise
    for la, lb, kind in pairs:
        for name, key in keys.items():
            a, b, seeds = _pairs(groups[la], groups[lb], key, la, lb)
            if not a.size:
                continue
            d, lo, hi = paired_bootstrap(a, b, n_resamples=n_resamples, confidence=confidence, seed=seed)
            out["comparisons"].append({"group": la, "vs": lb, "kind": kind, "metric": name, "n_pairs": int(a.size),
                                       "data_seeds": [str(s) for s in seeds], "diff": 100 * d,
                                       "ci": [100 * lo, 100 * hi], "verdict": verdict(lo, hi)})
    return out


def paired_table(comparison: dict[str, Any]) -> str:
    """Markdown of :func:`paired_comparison`: a group table (mean ± std over seeds, ×100) and a
    difference table (Δ ×100 vs the baseline / noise-floor partner, paired bootstrap interval, verdict)."""
    groups = comparison["groups"]
    names = list(next(iter(groups.values()))["metrics"])
    lines = ["| group | data seeds | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for label, g in groups.items():
        cells = []
        for n in names:
            m = g["metrics"][n]
            cells.append("–" if m["mean"] is None else
                         f"{m['mean']:.2f}" + ("" if m["std"] is None else f" ± {m['std']:.2f}"))
        lines.append(f"| {label} | {', '.join(g['data_seeds'])} | " + " | ".join(cells) + " |")
    pct = round(100 * comparison["confidence"])
    lines += ["", f"Paired differences (×100; {pct} % bootstrap interval over (data seed, case) pairs, "
              f"{comparison['n_resamples']} resamples; baseline: {comparison['baseline']}):", "",
              f"| comparison | metric | pairs | Δ | {pct} % interval | verdict |", "|---|---|---:|---:|---|---|"]
    for c in comparison["comparisons"]:
        what = f"{c['group']} − {c['vs']}" + (" (noise floor)" if c["kind"] == "noise floor" else "")
        lines.append(f"| {what} | {c['metric']} | {c['n_pairs']} | {c['diff']:+.2f} | "
                     f"[{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}] | {c['verdict']} |")
    return "\n".join(lines)


def _timing_table(results: dict[str, Any]) -> str:
    lines = ["| batch | edits | " + " | ".join(_STAGES) + " | total (s) | peak RSS (MB) | device peak (MB) |",
             "|---:|---:|" + "---:|" * (len(_STAGES) + 3)]
    for e in results.get("batches", []):
        t = e.get("timings", {})
        lines.append(f"| {e['batch']} | {e['n_edits']} | " + " | ".join(_fmt(t.get(s)) for s in _STAGES)
                     + f" | {_fmt(t.get('total'))} | {_fmt(e.get('peak_rss_mb'))} | {_fmt(e.get('device_peak_mb'))} |")
    return "\n".join(lines)


def write_results_md(path: str | Path, results: dict[str, Any]) -> Path:
    """results.md: setup, pre/post table, per-batch timings, GLUE (when run)."""
    r = results
    parts = [
        f"# {r['method']} on {r['model']} ({r['kind']})", "",
        f"{r['n_cases']} cases, {r['n_batches']} sequential batches of ≤{r['batch_size']}, "
        f"edited layers {r['layers']}; device {r.get('device')}.", "",
        "## Metrics (×100; CounterFact: Eff/Gen/Spe = success rates; ZsRE: token top-1 accuracy)", "",
        metrics_table(r), "",
        "## Per-batch wall time (s) and peak memory", "", _timing_table(r), "",
    ]
    if r.get("glue"):
        tasks = sorted({t for g in r["glue"] for t in g["tasks"]})
        parts += ["## General capability (f1_new = likelihood-scored F1 ×1)", "",
                  "| edits | " + " | ".join(tasks) + " |", "|---:|" + "---:|" * len(tasks)]
        for g in r["glue"]:
            parts.append(f"| {g['n_edits']} | " + " | ".join(_fmt(g['tasks'].get(t, {}).get('f1_new')) for t in tasks) + " |")
        parts.append("")
    parts += ["## Wall time (s)", "", " · ".join(f"{k} {v}" for k, v in r.get("wall_s", {}).items()), ""]
    p = Path(path)
    p.write_text("\n".join(parts))
    return p


def write_plots(directory: str | Path, results: dict[str, Any]) -> list[Path]:
    """PNG plots: per-batch edit success vs edits, GLUE vs edits, per-batch stage timings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    batches = results.get("batches", [])
    ev = [(e["n_edits"], e["eval"]) for e in batches if e.get("eval")]
    if ev:
        fig, ax = plt.subplots(figsize=(6, 4))
        for k in ("efficacy", "generalization", "specificity"):
            xs = [n for n, m in ev if m.get(k) is not None]
            ys = [m[k] for n, m in ev if m.get(k) is not None]
            if xs:
                ax.plot(xs, ys, marker="o", label=k)
        ax.set_xlabel("number of edits")
        ax.set_ylabel("just-edited batch (×100)")
        ax.set_title(f"{results['method']}: per-batch edit metrics")
        ax.legend()
        fig.tight_layout()
        out.append(d / "edit_metrics.png")
        fig.savefig(out[-1], dpi=100)
        plt.close(fig)
    glue = results.get("glue") or []
    if glue:
        fig, ax = plt.subplots(figsize=(6, 4))
        tasks = sorted({t for g in glue for t in g["tasks"]})
        for t in tasks:
            pts = [(g["n_edits"], g["tasks"][t].get("f1_new")) for g in glue if t in g["tasks"]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=t)
        ax.set_xlabel("number of edits")
        ax.set_ylabel("F1 (likelihood scoring)")
        ax.set_title("general capability")
        ax.legend()
        fig.tight_layout()
        out.append(d / "glue.png")
        fig.savefig(out[-1], dpi=100)
        plt.close(fig)
    if batches:
        fig, ax = plt.subplots(figsize=(7, 4))
        xs = [e["batch"] for e in batches]
        bottom = [0.0] * len(xs)
        for s in _STAGES:
            ys = [float(e.get("timings", {}).get(s) or 0.0) for e in batches]
            if any(ys):
                ax.bar(xs, ys, bottom=bottom, label=s)
                bottom = [a + b for a, b in zip(bottom, ys)]
        if len(xs) <= 30:
            ax.set_xticks(xs)
        ax.set_xlabel("batch")
        ax.set_ylabel("seconds")
        ax.set_title("per-batch wall time by stage (batch 1 includes compilation)")
        ax.legend(fontsize=8, loc="upper left")
        mem = [e.get("device_peak_mb") or e.get("peak_rss_mb") for e in batches]
        if all(m is not None for m in mem):
            ax2 = ax.twinx()
            ax2.plot(xs, mem, color="black", marker="x", label="peak memory")
            ax2.set_ylabel("peak MB (device, else process RSS)")
            ax2.set_ylim(bottom=0)
        fig.tight_layout()
        out.append(d / "timings.png")
        fig.savefig(out[-1], dpi=100)
        plt.close(fig)
    return out
