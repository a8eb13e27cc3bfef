"""Print a markdown method table from finished run directories (METHOD.md §9).

    python launch/compare.py runs/cf200_memit runs/cf200_alphaedit runs/cf200_metake

Each directory holds the ``results.json`` that launch/edit.py writes; all runs must be on the
same benchmark and number of cases.  Rows: the unedited model (pre-edit metrics of the first
run), then one row per run (post-edit metrics ×100) with median per-batch seconds.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path



def main(argv: list[str]) -> int:
    from metake_jax.report import compare_table

    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    runs = []
    for d in argv:
        p = Path(d) / "results.json"
        if not p.is_file():
            print(f"error: {p} not found (is the run finished?)", file=sys.stderr)
            return 2
        runs.append(json.loads(p.read_text()))
    try:
        print(compare_table(runs))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
