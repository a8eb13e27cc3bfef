"""The family registry (models/families): every registered family and random variant, generically.

Oracles: identities (HF names → params → HF names; config → config.json → config) and the
layout table of models/families/base.py; torch parity per family lives in test_models_parity.py.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

from models import families
from models.errors import ConversionError
from models.hf_layout import config_from_hf, hf_to_params, params_to_hf
from models.interface import WDeltas, forward, w_out, with_w_out
from models.random_model import param_shapes, random_config, random_params

VARIANTS = [v for f in families.names() for v in (families.get(f).random_variants or {f: {}})]


def _arch(cfg):
    """The fields that define the computation (not name / dtypes / how optional fields are spelled)."""
    return (cfg.family, cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.hd, cfg.d_ff,
            cfg.max_positions, cfg.norm_eps, cfg.rope_theta, cfg.rotary_dim or cfg.hd, cfg.tie_embeddings,
            cfg.lm_head_bias, cfg.attn_bias, cfg.qk_norm, families.block_options(cfg))


@pytest.fixture(scope="module", params=VARIANTS)
def model(request):
    cfg = random_config(request.param, "tiny", vocab_size=61)
    return cfg, random_params(cfg, seed=1)


def test_registry_errors():
    with pytest.raises(ValueError, match=r"unknown model family 'bert'.*gpt2"):
        families.get("bert")
    with pytest.raises(ConversionError, match=r"unknown architecture model_type='bert'.*llama"):
        config_from_hf({"model_type": "bert"})
    with pytest.raises(ValueError, match=r"random model: unknown family 'bert'.*qwen3"):
        random_config("bert")


def test_shapes_follow_the_layout(model):
    cfg, params = model
    shapes = jax.tree.map(lambda a: tuple(a.shape), params)
    assert shapes == jax.tree.map(tuple, param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
    assert params["layers"]["mlp"]["fc_out"]["kernel"].shape == (cfg.n_layers, cfg.d_key, cfg.d_model)


def test_hf_names_round_trip(model):
    cfg, params = model
    state = params_to_hf(cfg, params)
    assert len(state) == len(set(state))
    back = hf_to_params(cfg, list(state), state.__getitem__)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_hf_config_round_trip(model):
    cfg, _ = model
    fam = families.get(cfg.family)
    hf = fam.hf_config(cfg)
    assert hf["model_type"] in fam.model_types
    assert _arch(config_from_hf(hf)) == _arch(cfg)


def test_forward_and_w_out(model):
    """Finite logits; a W_out delta written with with_w_out equals the forward hook's delta."""
    cfg, params = model
    tokens = np.arange(12).reshape(2, 6) % cfg.vocab_size
    delta = jax.numpy.asarray(np.random.default_rng(0).normal(0, 0.5, (1, cfg.d_key, cfg.d_model)), np.float32)
    edited = with_w_out(params, (1,), w_out(params, (1,)) + delta)
    np.testing.assert_allclose(np.asarray(w_out(edited, 1)), np.asarray(w_out(params, 1) + delta[0]), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(w_out(with_w_out(params, (1,), delta, add=True), (1,))),
                                  np.asarray(w_out(edited, (1,))))
    a = forward(cfg, edited, tokens).logits
    b = forward(cfg, params, tokens, w_out_deltas=WDeltas((1,), delta)).logits
    assert np.isfinite(np.asarray(a)).all()
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    with pytest.raises(ValueError, match="expected"):
        with_w_out(params, (0, 1), delta)


def test_packed_rows_equal_rows_alone(model):
    """``forward(segments=…)``: three sequences packed side by side in one row (plus padding) give, at
    every real position, the logits each gives alone — position ids restart per segment (learned and
    rotary positions alike) and attention stays within a segment."""
    import jax.numpy as jnp

    cfg, params = model
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, cfg.vocab_size, size=n) for n in (5, 3, 7)]
    W = 18
    tokens = np.zeros((1, W), np.int32)
    segments = np.zeros((1, W), np.int32)
    start = 0
    for j, s in enumerate(seqs):
        tokens[0, start:start + len(s)] = s
        segments[0, start:start + len(s)] = j + 1
        start += len(s)
    mask = segments > 0
    packed = np.asarray(forward(cfg, params, jnp.asarray(tokens), jnp.asarray(mask),
                                segments=jnp.asarray(segments)).logits)
    start = 0
    for s in seqs:
        alone = np.asarray(forward(cfg, params, jnp.asarray(s[None].astype(np.int32))).logits)[0]
        got = packed[0, start:start + len(s)]
        assert np.abs(got - alone).max() <= 1e-5 * max(np.abs(alone).max(), 1.0)
        start += len(s)
    # without segments the second sequence would see the first: the check above can fail
    plain = np.asarray(forward(cfg, params, jnp.asarray(tokens), jnp.asarray(mask)).logits)
    assert np.abs(plain[0, 5:8] - packed[0, 5:8]).max() > 1e-4
