"""A tiny random Llama-family model on 8 demo requests: offline, seconds per stage (tests, smoke runs)."""
from configs import base


def get_config():
    c = base.get_config()
    c.model = "random:llama:tiny"  # random weights + built-in BPE tokenizer (models/random_model.py)
    c.method = "metake"
    c.layers = (1, 2)
    c.data.path = "demo"
    c.data.format = "flat"
    c.data.n = 8
    c.batch_size = 4
    c.stage1.steps = 4
    c.stage1.weight_decay = 0.0
    c.editor.alphaedit.l2 = 1.0
    c.editor.nullspace_threshold = 1e-3
    c.metake.steps = 2
    c.stats.kind = "model"
    c.stats.n_samples = 8
    c.stats.max_len = 16
    c.templates.length = 5
    c.eval.glue_every = -1
    c.eval.batch_size = 16
    c.progress = False
    c.run_dir = "runs/tiny_cf"
    return c
