"""Human-readable outputs of a run: the pre/post markdown table and PNG plots (METHOD.md §8–§9).

``results`` is the dict ``metake_jax.runner.run`` returns (and writes to results.json).
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

__all__ = ["compare_table", "metrics_table", "write_plots", "write_results_md"]

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
