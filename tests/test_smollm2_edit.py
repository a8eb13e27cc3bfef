"""Integration (issue 3): AlphaEdit on SmolLM2 with statistics from a small model-sampled corpus.

Nine project-written requests in three sequential batches: after the last batch P(new) > P(true)
on ≥ 90% of all edit prompts (so earlier batches' edits are kept), and ≥ 80% of unrelated prompts
keep their top-1 next token.  Skips only if the embedded model cannot be obtained.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from configs.smollm2_cf import SMOLLM2_TUNED
from metake_jax.data.loaders import load_demo
from metake_jax.editor import EditConfig, edit_batch, init_state
from metake_jax.evaluate.scoring import target_logprobs  # (mean NLL, all-correct)
from metake_jax.projector import projectors_for_layers
from metake_jax.stats import CorpusSpec, layer_stats
from metake_jax.targets import StageIConfig
from metake_jax.editors.alphaedit import AlphaEdit
from models.interface import forward

UNRELATED = [
    "The capital of Japan is", "Water is made of hydrogen and", "The largest planet in the solar system is",
    "Albert Einstein was born in", "The chemical symbol for gold is", "The Amazon river flows through",
    "Shakespeare wrote the play", "The first man on the moon was", "Mount Everest is located in",
    "The currency of the United Kingdom is the",
]


@pytest.fixture(scope="module")
def smol():
    from models.embedded import load_smollm2

    try:
        return load_smollm2()
    except Exception as e:  # pragma: no cover - only when the wheel cannot be fetched
        pytest.skip(f"embedded SmolLM2 unavailable: {e}")


def _top1(cfg, params, tok, prompts):
    enc = tok(prompts, padding=True, return_tensors="np")
    logits = forward(cfg, params, jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"])).logits
    last = enc["attention_mask"].sum(1) - 1
    return np.asarray(logits)[np.arange(len(prompts)), last].argmax(-1)


def test_alphaedit_sequential_on_smollm2(smol, tmp_path):
    cfg, params, tok = smol
    layers = tuple(SMOLLM2_TUNED["layers"])
    from metake_jax.templates import context_templates

    templates = context_templates(cfg, params, tok, seed=0)
    C0 = layer_stats(cfg, params, tok, layers, CorpusSpec(kind="model", seed=1), n_samples=32, max_len=64,
                     cache_dir=tmp_path, model_id="smollm2-test")
    P, ranks = projectors_for_layers(C0, threshold=2e-2)
    assert all(0 < r < cfg.d_ff for r in np.asarray(ranks))
    state = init_state(params, cfg, layers, P=P)
    ecfg = EditConfig(layers=layers, stage1=StageIConfig(lr=SMOLLM2_TUNED["lr"], steps=SMOLLM2_TUNED["steps"]),
                      editor=AlphaEdit(l2=10.0))
    cases = load_demo(tokenizer=tok)[:9]
    reqs = [c.request for c in cases]
    top_before = _top1(cfg, params, tok, UNRELATED)
    prefixes = [r.text for r in reqs]

    def success(p):
        nll_new = target_logprobs(cfg, p, tok, prefixes, [" " + r.target_new for r in reqs])[0]
        nll_true = target_logprobs(cfg, p, tok, prefixes, [" " + r.target_true for r in reqs])[0]
        return np.asarray(nll_new) < np.asarray(nll_true)

    assert success(params).mean() < 0.5  # the model starts out preferring the true objects
    for i in range(3):
        state, rep = edit_batch(cfg, state, tok, reqs[3 * i: 3 * i + 3], templates, ecfg)
        assert np.isfinite(rep.stage1_losses).all()
        if i == 0:
            first = success(state.params)[:3]
    assert state.n_edits == 9
    ok = success(state.params)
    assert ok.mean() >= 0.9, ok
    assert ok[:3].sum() >= first.sum() - 1  # earlier edits kept after two more batches
    kept = (_top1(cfg, state.params, tok, UNRELATED) == top_before).mean()
    assert kept >= 0.8, kept
    # C_p accumulated the keys of all three batches: rank grows with edits
    assert float(jnp.linalg.matrix_rank(state.stats.Cp[-1])) >= 9
