"""GPT-2 XL on CounterFact with the reference hyper-parameters (docs/FORMULAS.md §R6, AE hparams/AlphaEdit + MEMIT).

``--config=configs/gpt2xl_cf.py:<method>`` sets ``method`` and that method's reference values from
``METHOD_PRESETS`` (docs/FORMULAS.md §R6 "Baselines"); without an argument: the AlphaEdit/MEMIT reference.
Pass a local checkpoint with --config.model=/path/to/hf_dir (the default is the hub id, which
needs network access).
"""
from configs import base

MODEL = dict(model="gpt2-xl", layers=(13, 14, 15, 16, 17), lr=0.5, steps=20, max_len=1024,
             mom2_update_weight=20000.0)

#: editor -> {config field: reference value} (BASELINES.md §1 kmeng01/rome hparams/ROME/gpt2-xl.json,
#: §7 unified-model-editing hparams/EMMET/gpt2-xl.json)
METHOD_PRESETS = {
    "rome": {"editor.rome.layers": (17,), "editor.rome.mom2_adjustment": True, "stage1.lr": 0.5, "stage1.steps": 20,
             "stage1.clamp_norm_factor": 4.0, "stage1.weight_decay": 0.5, "stage1.kl_factor": 0.0625,
             "templates.n_per_prompt": 2, "templates.lengths": (5, 10)},  # 21 templates, rome_main.py
    "emmet": {"editor.emmet.layers": (17,), "editor.emmet.mom2_update_weight": 1000.0, "editor.emmet.emmet_lambda": 0.1,
              "editor.emmet.update_norm_lambda": 0.0, "stage1.lr": 0.5, "stage1.steps": 20,
              "stage1.clamp_norm_factor": 0.75, "stage1.weight_decay": 0.5, "stage1.kl_factor": 0.0625},
    # BASELINES.md §5 xpq-tech/BLUE hparams/AlphaEdit/gpt2-xl-blue.json (boundary layers (13, 17) = first/last of
    # MODEL["layers"]); §4 BLUE hparams/PMET/gpt2-xl.json
    "blue": {"editor.blue.l2": 80.0},
    "pmet": {"stage1.clamp_norm_factor": 2.0, "stage1.lr": 0.5, "stage1.steps": 20,
             "editor.pmet.mom2_update_weight": 10000.0},
    **base.derived_presets(mom2_update_weight=MODEL["mom2_update_weight"], neurons="in"),
}


def get_config(method=None):
    return base.with_method(base.counterfact(base.reference(**MODEL), "gpt2xl_cf"), method, METHOD_PRESETS)
