"""Run-state checkpoints of a sequential editing run (docs/FORMULAS.md §9), with orbax.

What is saved after every batch (``run_dir/checkpoints/<step>/``, step = batches done):

* ``arrays``: the edited layers' fc_out kernels ``(m, d_k, d)`` and ``C_p`` ``(m, d_k, d_k)`` —
  everything of the edit state that is not a pure function of the config (the base model,
  templates, C0 and P are reloaded / recomputed deterministically; the stream uses no RNG, and the
  ``rng`` array of older checkpoints is ignored on restore);
* ``meta`` (JSON): stream cursor (cases done and their ids), batch log, metrics so far, config.

Saving is synchronous and orbax finalizes a step directory atomically, so a run killed at any
point resumes from the last complete batch.  Only the latest ``keep`` steps are kept.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["RunCheckpointer"]


class RunCheckpointer:
    """Thin wrapper over ``orbax.checkpoint.CheckpointManager`` (arrays + JSON metadata per step)."""

    def __init__(self, directory: str | Path, keep: int = 2) -> None:
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(directory).expanduser().absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        opts = ocp.CheckpointManagerOptions(max_to_keep=max(1, int(keep)), create=True,
                                            enable_async_checkpointing=False)
        self._mgr = ocp.CheckpointManager(self.directory, options=opts, item_names=("arrays", "meta"))

    def latest(self) -> int | None:
        """The last complete step, or None."""
        return self._mgr.latest_step()

    def steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def save(self, step: int, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
        """Write step ``step`` (arrays must be finite; written as numpy)."""
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        for k, v in arrays.items():
            if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all():
                raise ValueError(f"checkpoint step {step}: array {k!r} has non-finite values; not saved")
        ocp = self._ocp
        self._mgr.save(int(step), args=ocp.args.Composite(
            arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)), force=True)
        self._mgr.wait_until_finished()

    def restore(self, step: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """(arrays, meta) of ``step`` (default: the latest)."""
        step = self.latest() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        ocp = self._ocp
        out = self._mgr.restore(int(step), args=ocp.args.Composite(
            arrays=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
        arrays = {k: np.asarray(v) for k, v in out["arrays"].items()}
        return arrays, dict(out["meta"])

    def close(self) -> None:
        self._mgr.close()
