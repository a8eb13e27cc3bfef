"""Sequential knowledge editing from a config file (docs/FORMULAS.md §9).

    python launch/edit.py --config=configs/smollm2_cf.py
    python launch/edit.py --config=configs/smollm2_cf.py --config.batch_size=10 --config.method=alphaedit
    python launch/edit.py --config=configs/gptj_cf.py --config.model=/models/gpt-j-6B --config.run_dir=runs/gptj
    python launch/edit.py --config=configs/smollm2_cf.py --config.resume=True     # continue a stopped run

Every field of ``configs/base.py`` can be overridden with ``--config.<field>=<value>``.
A user error (bad record, missing file, bad config value) ends in one line ``error: ...`` naming
the record and field, exit status 2, and nothing written to ``run_dir``.
Outputs go to ``config.run_dir``: results.json, results.md, plots/, eval_{pre,post}.json,
templates.json, checkpoints/ (the latest 2), edit_log.jsonl.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # respect the user's values; default: no network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from ml_collections import config_flags  # noqa: E402


def _fields_help() -> str:
    """Every overridable field with its configs/base.py default, for --help."""
    from configs import base

    def flat(d, prefix=""):
        for k, v in d.items():
            if hasattr(v, "items"):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"--config.{prefix}{k}={v!r}"

    return "\n".join(flat(base.get_config()))


_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "run configuration file (configs/*.py); any field can be overridden with "
    "--config.<field>=<value>. Fields (configs/base.py defaults):\n" + _fields_help(), lock_config=True)


def main(argv: list[str]) -> None:
    from launch._common import checked_config, setup_logging

    config = checked_config(argv, _CONFIG.value)
    setup_logging()
    from metake_jax.report import metrics_table
    from metake_jax.runner import run

    results = run(config)  # user errors: one line and exit status 2 (launch._common.run_cli)
    print()
    print(f"{results['method']} on {results['model']}: {results['n_cases']} {results['kind']} cases, "
          f"{results['n_batches']} batches of <= {results['batch_size']}")
    print(metrics_table(results))
    print(f"wall time {results['wall_s'].get('total')} s; results in {Path(str(config.run_dir)).expanduser()}")


if __name__ == "__main__":
    from launch._common import run_cli

    run_cli(main)
