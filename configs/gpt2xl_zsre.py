"""GPT-2 XL on ZsRE with the reference hyper-parameters (docs/FORMULAS.md §R6, AE hparams/AlphaEdit + MEMIT).

Pass a local checkpoint with --config.model=/path/to/hf_dir (the default is the hub id, which
needs network access).  ``:<method>`` as in the CounterFact config (``METHOD_PRESETS``).
"""
from configs import base
from configs.gpt2xl_cf import METHOD_PRESETS, MODEL


def get_config(method=None):
    return base.with_method(base.zsre(base.reference(**MODEL), "gpt2xl_zsre"), method, METHOD_PRESETS)
