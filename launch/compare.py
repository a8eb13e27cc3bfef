"""Method tables from finished run directories (docs/FORMULAS.md §9, §11).

Plain table (one row per run, post-edit metrics ×100, median per-batch seconds)::

    python launch/compare.py runs/cf200_memit runs/cf200_alphaedit runs/cf200_metake

Paired statistics (§11) over runs made with ``--config.data.seed=S`` (each directory also needs the
``eval_post.json`` with per-case metrics)::

    python launch/compare.py --paired --baseline=alphaedit --json=cmp.json runs/s{0,1,2}_{alphaedit,metake}

Runs are grouped by method (plus the template seed when two runs of one method share a data seed:
the noise floor, ``--config.templates.seed``); per group mean ± std over data seeds; per group the
mean per-case difference to the baseline group with a paired bootstrap interval, pairing by
(data seed, case_id); "no difference" when the interval contains 0.  ``--baseline``/``--json``
imply ``--paired``.  Exit status 2 with a one-line error for missing files or mismatched runs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path



def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compare.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (results.json [+ eval_post.json])")
    p.add_argument("--paired", action="store_true", help="paired bootstrap statistics (docs/FORMULAS.md §11)")
    p.add_argument("--baseline", default=None, help="baseline group label (default: the first group)")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (>= 1000)")
    p.add_argument("--confidence", type=float, default=0.95, help="interval confidence level")
    p.add_argument("--seed", type=int, default=0, help="bootstrap RNG seed")
    p.add_argument("--json", default=None, help="also write the paired statistics to this JSON file")
    return p


def _load(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found ({what})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FileNotFoundError(f"{path} is not valid JSON ({e})") from e


def main(argv: list[str]) -> int:
    from metake_jax.report import compare_table, paired_comparison, paired_table

    if not argv:
        print(__doc__)
        return 2
    args = _parser().parse_args(argv)
    paired = args.paired or args.baseline is not None or args.json is not None
    try:
        runs = []
        for d in args.runs:
            r = {"name": d, "results": _load(Path(d) / "results.json", "is the run finished?")}
            if paired:
                r["post"] = _load(Path(d) / "eval_post.json", "paired statistics need per-case metrics: "
                                  "run with eval.final=True")
            runs.append(r)
        if not paired:
            print(compare_table([r["results"] for r in runs]))
            return 0
        cmp = paired_comparison(runs, baseline=args.baseline, n_resamples=args.resamples,
                                confidence=args.confidence, seed=args.seed)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyError as e:
        print(f"error: a results.json / eval_post.json lacks the field {e}", file=sys.stderr)
        return 2
    print(paired_table(cmp))
    if args.json:
        Path(args.json).write_text(json.dumps(cmp, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
