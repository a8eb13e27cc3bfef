"""GPT-2 XL on CounterFact with the reference hyper-parameters (docs/FORMULAS.md §R6, AE hparams/AlphaEdit + MEMIT).

Pass a local checkpoint with --config.model=/path/to/hf_dir (the default is the hub id, which
needs network access).
"""
from configs import base

MODEL = dict(model="gpt2-xl", layers=(13, 14, 15, 16, 17), lr=0.5, steps=20, max_len=1024,
             mom2_update_weight=20000.0)


def get_config():
    return base.counterfact(base.reference(**MODEL), "gpt2xl_cf")
