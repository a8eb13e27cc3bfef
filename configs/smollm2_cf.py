"""SmolLM2-135M-Instruct (embedded, offline) on the bundled demo CounterFact set — the README's main job.

Statistics come from a small corpus sampled from the model itself (offline); fluency and GLUE
are off by default (turn them on with ``--config.eval.fluency=True`` / ``--config.eval.glue_every=1``).
The edited layers and Stage I hyper-parameters live in ONE place, ``SMOLLM2_TUNED`` below
(``smollm2_zsre.py`` imports it).
"""
from configs import base

# Tuned for SmolLM2-135M (the lead edits this dict; see bench/RESULTS.md).
SMOLLM2_TUNED = dict(
    layers=(4, 5, 6, 7, 8),
    lr=0.5,  # Stage I v_lr
    steps=25,  # Stage I v_num_grad_steps
)


def apply_smollm2(c):
    """Model, statistics and hyper-parameters shared by the SmolLM2 configs."""
    c.model = "smollm2"
    c.layers = tuple(SMOLLM2_TUNED["layers"])
    c.stage1.lr = SMOLLM2_TUNED["lr"]
    c.stage1.steps = SMOLLM2_TUNED["steps"]
    c.stats.kind = "model"  # texts sampled from SmolLM2 itself: offline and fast
    c.stats.n_samples = 64
    c.stats.max_len = 64
    c.stats.seed = 1
    c.eval.fluency = False
    c.eval.glue_every = -1  # GLUE off (enable: 0 = base+final, k = every k batches)
    c.eval.glue_n = 20
    c.eval.glue_generation = False
    return c


def get_config():
    c = apply_smollm2(base.get_config())
    # alphaedit by default: MetaKE's look-ahead adds ~60 % of Stage I per batch on CPU (bench/RESULTS.md);
    # run MetaKE with --config.method=metake
    c.method = "alphaedit"
    c.data.path = "demo"  # metake_jax/data/demo_counterfact.json (~50 project-written requests)
    c.data.format = "flat"
    c.batch_size = 10
    c.run_dir = "runs/smollm2_cf"
    return c
