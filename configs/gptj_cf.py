"""GPT-J-6B on CounterFact with the reference hyper-parameters (docs/FORMULAS.md §R6, AE hparams/AlphaEdit + MEMIT).

Pass a local checkpoint with --config.model=/path/to/hf_dir (the default is the hub id, which
needs network access).
"""
from configs import base

MODEL = dict(model="EleutherAI/gpt-j-6B", layers=(3, 4, 5, 6, 7, 8), lr=0.5, steps=25, max_len=2048,
             mom2_update_weight=15000.0)


def get_config():
    return base.counterfact(base.reference(**MODEL), "gptj_cf")
