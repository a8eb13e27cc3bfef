"""Qwen3-8B on CounterFact (family llama with q/k RMS-norm).

No reference hyper-parameters exist for Qwen3: these are the Llama3-8B values of docs/FORMULAS.md §R6
(layers 4–8, v_lr 0.1, 25 steps) and the AE cap of 4096 tokens for Qwen statistics; untuned.
Pass a local checkpoint with ``--config.model=/path/to/Qwen3-8B``.
"""
from configs import llama3_cf


def get_config(method=None):
    c = llama3_cf.get_config(method)
    c.model = "Qwen/Qwen3-8B"
    c.stats.max_len = 4096  # AE / EE cap the statistics length at 4096 for Qwen models
    c.run_dir = "runs/qwen3_cf" + (f"_{method}" if method else "")
    return c
