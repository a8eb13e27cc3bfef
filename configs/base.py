"""The base run configuration: every field at its default (docs/FORMULAS.md §3–§9, §R5–§R8).

The fields, their types, defaults and meaning are defined once, in ``metake_jax/run_config.py``
(``RunConfig`` and its sections); ``get_config()`` is that default as an ml_collections ConfigDict.
Use a model/dataset config (e.g. ``configs/smollm2_cf.py``) and override fields on the command line::

    python launch/edit.py --config=configs/smollm2_cf.py --config.batch_size=10 --config.method=metake

``python launch/edit.py --help`` lists every field with its default.  Fields that are None by
default are ml_collections placeholders (overridable with a value).
"""
from __future__ import annotations

import math

from ml_collections import ConfigDict

from metake_jax.methods import methods, resolve
from metake_jax.run_config import SHARED_DATA, RunConfig, data_path, to_config_dict

__all__ = ["SHARED_DATA", "counterfact", "data_path", "get_config", "reference", "with_method", "zsre"]


def get_config() -> ConfigDict:
    """``RunConfig()`` (every default) as the user-facing ConfigDict."""
    return to_config_dict(RunConfig())


def reference(*, model: str, layers: tuple[int, ...], lr: float, steps: int, max_len: int,
              mom2_update_weight: float) -> ConfigDict:
    """A paper-model config with the reference hyper-parameters (docs/FORMULAS.md §R6: AE hparams
    AlphaEdit + MEMIT; clamp 0.75, KL 0.0625, wd 0.5, L2 10, threshold 2e-2, 100k Wikipedia docs)."""
    c = get_config()
    c.model = model
    c.layers = tuple(layers)
    c.stage1.lr = lr  # v_lr
    c.stage1.steps = steps  # v_num_grad_steps
    c.stage1.clamp_norm_factor = 0.75
    c.stage1.kl_factor = 0.0625
    c.stage1.weight_decay = 0.5  # v_weight_decay
    c.editor.alphaedit.l2 = 10.0  # AlphaEdit L2
    c.editor.nullspace_threshold = 2e-2
    c.editor.memit.mom2_update_weight = mom2_update_weight  # MEMIT λ_C
    c.stats.kind = "datasets"  # wikipedia 20200501.en, 100k docs, seed 1 (docs/FORMULAS.md §R3)
    c.stats.n_samples = 100000
    c.stats.max_len = max_len  # n_positions / max_position_embeddings
    c.batch_size = 100  # sequential batches of 100 (docs/FORMULAS.md §9)
    c.remat = True  # GPT-J at batch 100: Stage I needs 127 GiB without it (bench/RESULTS.md, GPU)
    c.eval.glue_every = 5
    return c


def derived_presets(mom2_update_weight: float, neurons: str) -> dict[str, dict[str, object]]:
    """``METHOD_PRESETS`` rows of the editors that reuse MEMIT's / AlphaEdit's reference values for a model.

    RECT / PRUNE: MEMIT's λ_C (AE hparams/MEMIT; Stage I as the reference), AE/SP keep 0.4 (paper/RE: 0.2),
    α = e (BASELINES.md §2–§3).  SPHERE: AlphaEdit's L2 10, SP README β = 0.5, α = 0.5 (no published
    per-model values); ``neurons``: the stored layout of fc_out ("out" for HF Linear, "in" for GPT-2's
    Conv1D; BASELINES.md §6)."""
    return {
        "rect": {"editor.rect.mom2_update_weight": mom2_update_weight, "editor.rect.keep": 0.4},
        "prune": {"editor.prune.mom2_update_weight": mom2_update_weight, "editor.prune.alpha": math.e},
        "sphere": {"editor.sphere.l2": 10.0, "editor.sphere.beta": 0.5, "editor.sphere.alpha": 0.5,
                   "editor.sphere.neurons": neurons},
    }


def with_method(c: ConfigDict, method: str | None, presets: dict[str, dict[str, object]]) -> ConfigDict:
    """``c`` set up for ``method`` with that method's reference hyper-parameters for this model.

    ``presets`` (one table per paper-model config module, ``METHOD_PRESETS``): editor name ->
    ``{dotted config field: value}`` (Stage I fields and ``editor.<name>.*``), applied for ``method`` and
    for ``metake_<editor>``.  ``method`` None or "" leaves ``c`` as it is (the AlphaEdit/MEMIT reference);
    an editor without a row (memit, alphaedit) needs none.  The run directory gets the method's name.
    Used as ``--config=configs/gptj_cf.py:rome``.  Raises ValueError naming an unknown method."""
    if not method:
        return c
    if method not in methods():
        raise ValueError(f"config argument {method!r} is not a method (one of {', '.join(methods())})")
    c.method = method
    for field, value in presets.get(resolve(method).editor, {}).items():
        node = c
        *path, leaf = field.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    c.run_dir = f"{c.run_dir}_{method}"
    return c


def _dataset(c: ConfigDict, name: str, path: str, fmt: str, n: int) -> ConfigDict:
    c.data.path = data_path(path)
    c.data.format = fmt
    c.data.n = n
    c.run_dir = f"runs/{name}"
    return c


def counterfact(c: ConfigDict, name: str) -> ConfigDict:
    """2000 CounterFact edits (flat split in ../shared/data) in batches of 100."""
    return _dataset(c, name, "counterfact_easyedit/counterfact-edit.json", "flat", 2000)


def zsre(c: ConfigDict, name: str) -> ConfigDict:
    """ZsRE (MEND format; the 1k file in ../shared/data, or the 19k eval file via --config.data.path)."""
    return _dataset(c, name, "zsre_mend_train_1k.json", "zsre", 1000)

