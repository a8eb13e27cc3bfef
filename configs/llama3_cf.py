"""Llama3-8B-Instruct on CounterFact with the reference hyper-parameters (REFERENCE.md §6, AE hparams/AlphaEdit + MEMIT).

Pass a local checkpoint with --config.model=/path/to/hf_dir (the default is the hub id, which
needs network access).
"""
from configs import base


def get_config():
    c = base.get_config()
    c.model = "meta-llama/Meta-Llama-3-8B-Instruct"
    c.layers = (4, 5, 6, 7, 8)
    c.stage1.lr = 0.1  # v_lr
    c.stage1.steps = 25  # v_num_grad_steps
    c.stage1.clamp_norm_factor = 0.75
    c.stage1.kl_factor = 0.0625
    c.stage1.weight_decay = 0.5  # v_weight_decay
    c.editor.l2 = 10.0  # AlphaEdit L2
    c.editor.nullspace_threshold = 2e-2
    c.editor.mom2_update_weight = 15000.0  # MEMIT λ_C
    c.stats.kind = "datasets"  # wikipedia 20200501.en, 100k docs, seed 1 (REFERENCE.md §3)
    c.stats.n_samples = 100000
    c.stats.max_len = 8192  # n_positions / max_position_embeddings
    c.data.path = base.data_path("counterfact_easyedit/counterfact-edit.json")
    c.data.format = "flat"
    c.data.n = 2000
    c.batch_size = 100  # 2000 edits = 20 sequential batches of 100 (METHOD.md §9)
    c.eval.glue_every = 5
    c.run_dir = "runs/llama3_cf"
    return c
