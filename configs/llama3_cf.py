"""Llama3-8B-Instruct on CounterFact with the reference hyper-parameters (docs/FORMULAS.md §R6, AE hparams/AlphaEdit + MEMIT).

Pass a local checkpoint with --config.model=/path/to/hf_dir (the default is the hub id, which
needs network access).
"""
from configs import base

MODEL = dict(model="meta-llama/Meta-Llama-3-8B-Instruct", layers=(4, 5, 6, 7, 8), lr=0.1, steps=25, max_len=8192,
             mom2_update_weight=15000.0)


def get_config():
    return base.counterfact(base.reference(**MODEL), "llama3_cf")
