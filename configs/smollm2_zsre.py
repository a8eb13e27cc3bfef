"""SmolLM2-135M-Instruct (embedded) on ZsRE (``../shared/data/zsre_mend_train_1k.json``), 100 cases."""
from configs import base
from configs.smollm2_cf import apply_smollm2


def get_config():
    c = apply_smollm2(base.get_config())
    c.method = "metake"
    c.data.path = base.data_path("zsre_mend_train_1k.json")
    c.data.format = "zsre"
    c.data.n = 100
    c.batch_size = 10
    c.run_dir = "runs/smollm2_zsre"
    return c
