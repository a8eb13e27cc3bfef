"""GPT-J-6B on CounterFact with the reference hyper-parameters (docs/FORMULAS.md §R6, AE hparams/AlphaEdit + MEMIT).

``--config=configs/gptj_cf.py:<method>`` sets ``method`` and that method's reference values from
``METHOD_PRESETS`` (docs/FORMULAS.md §R6 "Baselines"); without an argument: the AlphaEdit/MEMIT reference.
Pass a local checkpoint with --config.model=/path/to/hf_dir (the default is the hub id, which
needs network access).
"""
from configs import base

MODEL = dict(model="EleutherAI/gpt-j-6B", layers=(3, 4, 5, 6, 7, 8), lr=0.5, steps=25, max_len=2048,
             mom2_update_weight=15000.0)

#: editor -> {config field: reference value} (BASELINES.md §1 kmeng01/rome hparams/ROME/EleutherAI_gpt-j-6B.json,
#: §7 unified-model-editing hparams/EMMET/EleutherAI_gpt-j-6B.json)
METHOD_PRESETS = {
    "rome": {"editor.rome.layers": (5,), "editor.rome.mom2_adjustment": True, "stage1.lr": 0.5, "stage1.steps": 20,
             "stage1.clamp_norm_factor": 4.0, "stage1.weight_decay": 0.5, "stage1.kl_factor": 0.0625,
             "templates.n_per_prompt": 2, "templates.lengths": (5, 10)},  # 21 templates, rome_main.py
    "emmet": {"editor.emmet.layers": (5,), "editor.emmet.mom2_update_weight": 1.0, "editor.emmet.emmet_lambda": 0.1,
              "editor.emmet.update_norm_lambda": 0.0, "stage1.lr": 0.5, "stage1.steps": 25,
              "stage1.clamp_norm_factor": 0.75, "stage1.weight_decay": 0.5, "stage1.kl_factor": 0.0625},
    # BASELINES.md §5 xpq-tech/BLUE hparams/AlphaEdit/EleutherAI_gpt-j-6B-blue.json (boundary layers (3, 8));
    # §4 BLUE hparams/PMET (the official xpq-tech/PMET GPT-J uses 30 steps / lr 0.2, KL 1, λ 6000)
    "blue": {"editor.blue.l2": 95.0},
    "pmet": {"stage1.clamp_norm_factor": 0.75, "stage1.lr": 0.5, "stage1.steps": 25,
             "editor.pmet.mom2_update_weight": 15000.0},
    **base.derived_presets(mom2_update_weight=MODEL["mom2_update_weight"], neurons="out"),
}


def get_config(method=None):
    return base.with_method(base.counterfact(base.reference(**MODEL), "gptj_cf"), method, METHOD_PRESETS)
