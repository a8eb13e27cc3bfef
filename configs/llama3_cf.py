"""Llama3-8B-Instruct on CounterFact with the reference hyper-parameters (docs/FORMULAS.md §R6, AE hparams/AlphaEdit + MEMIT).

``--config=configs/llama3_cf.py:<method>`` sets ``method`` and that method's reference values from
``METHOD_PRESETS`` (docs/FORMULAS.md §R6 "Baselines"); without an argument: the AlphaEdit/MEMIT reference.
Pass a local checkpoint with --config.model=/path/to/hf_dir (the default is the hub id, which
needs network access).
"""
from configs import base

MODEL = dict(model="meta-llama/Meta-Llama-3-8B-Instruct", layers=(4, 5, 6, 7, 8), lr=0.1, steps=25, max_len=8192,
             mom2_update_weight=15000.0)

#: editor -> {config field: reference value}.  ROME: AE hparams/ROME/Llama3-8B.json (BASELINES.md §1;
#: mom2_adjustment false, weight decay 1e-3).  EMMET has no Llama-3 file: UM hparams/EMMET/llama2-7b.json
#: (BASELINES.md §7), the closest official one.
METHOD_PRESETS = {
    "rome": {"editor.rome.layers": (5,), "editor.rome.mom2_adjustment": False, "stage1.lr": 0.5, "stage1.steps": 25,
             "stage1.clamp_norm_factor": 4.0, "stage1.weight_decay": 1e-3, "stage1.kl_factor": 0.0625,
             "templates.n_per_prompt": 2, "templates.lengths": (5, 10)},  # 21 templates, rome_main.py
    "emmet": {"editor.emmet.layers": (5,), "editor.emmet.mom2_update_weight": 1.0, "editor.emmet.emmet_lambda": 0.1,
              "editor.emmet.update_norm_lambda": 0.0, "stage1.lr": 0.5, "stage1.steps": 25,
              "stage1.clamp_norm_factor": 4.0, "stage1.weight_decay": 1e-3, "stage1.kl_factor": 0.0625},
    # BASELINES.md §5 xpq-tech/BLUE hparams/AlphaEdit/Llama3-8B-blue.json (boundary layers (4, 8));
    # §4 BLUE hparams/PMET/Llama3-8B.json
    "blue": {"editor.blue.l2": 1.0},
    "pmet": {"stage1.clamp_norm_factor": 0.75, "stage1.lr": 0.1, "stage1.steps": 25,
             "editor.pmet.mom2_update_weight": 15000.0},
    **base.derived_presets(mom2_update_weight=MODEL["mom2_update_weight"], neurons="out"),
}


def get_config(method=None):
    return base.with_method(base.counterfact(base.reference(**MODEL), "llama3_cf"), method, METHOD_PRESETS)
