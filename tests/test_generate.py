"""KV-cached generation (models/generate.py) against independent oracles:
a no-cache greedy loop over ``models.interface.forward``, torch transformers ``generate``,
recomputed top-k sets, and the renormalised top-k distribution."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from metake_jax.templates import context_templates, template_from_text
from models.generate import generate, generate_tokens, sample_texts
from models.interface import forward
from tests.tiny import tiny_hf_model, tiny_tokenizer, to_jax

# larger init than the HF default so random tiny models do not collapse to one repeated token
CORPUS_LONG = "The Eiffel Tower is located in Paris. Michael Jordan plays basketball in Chicago."
INIT = {"llama": 0.2, "gpt2": 0.2, "gptj": 0.5}


@functools.lru_cache(maxsize=None)
def _model(family: str):
    hf = tiny_hf_model(family, initializer_range=INIT[family])
    cfg, params = to_jax(hf)
    return hf, cfg, params


def _left_padded(cfg, lens, seed=0, pad=0):
    rng = np.random.default_rng(seed)
    t0 = max(lens)
    toks = np.full((len(lens), t0), pad, np.int32)
    mask = np.zeros((len(lens), t0), bool)
    for r, n in enumerate(lens):
        toks[r, t0 - n:] = rng.integers(1, cfg.vocab_size, n)
        mask[r, t0 - n:] = True
    return toks, mask


@functools.partial(jax.jit, static_argnums=0)
def _logits(cfg, params, tokens, mask):
    return forward(cfg, params, tokens, mask).logits


def _greedy_oracle(cfg, params, toks, mask, n_new, width=48):
    """No cache: recompute the full forward each step, argmax at the last real position.

    The running sequence sits in a fixed-width right-padded buffer (one compile per batch size).
    """
    b, t0 = toks.shape
    assert t0 + n_new <= width
    buf = np.zeros((b, width), np.int32)
    m = np.zeros((b, width), bool)
    buf[:, :t0], m[:, :t0] = toks, mask
    for i in range(n_new):
        logits = np.asarray(_logits(cfg, params, buf, m))
        buf[:, t0 + i] = logits[:, t0 + i - 1].argmax(-1)  # right-appended: last real = t0+i-1
        m[:, t0 + i] = True
    return buf[:, :t0 + n_new]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj"])
def test_greedy_matches_no_cache_loop(family):
    _, cfg, params = _model(family)
    toks, mask = _left_padded(cfg, [7, 3, 1, 5], seed=1)
    n_new = 9
    got = np.asarray(generate_tokens(cfg, params, toks, mask, max_new_tokens=n_new))
    want = _greedy_oracle(cfg, params, toks, mask, n_new)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    assert len(set(want[:, 7:].ravel().tolist())) > 3  # non-degenerate continuations


def test_greedy_eos_stops_and_pads():
    _, cfg, params = _model("llama")
    toks, mask = _left_padded(cfg, [6, 2, 4], seed=2)
    n_new = 10
    plain = _greedy_oracle(cfg, params, toks, mask, n_new)
    gen = plain[:, 6:]
    eos = int(gen[0, 2])  # a token row 0 really emits
    out = generate(cfg, params, toks, mask, max_new_tokens=n_new, eos_token_id=eos)
    got_t, got_m = np.asarray(out.tokens), np.asarray(out.mask)
    np.testing.assert_array_equal(got_m[:, :6], mask)
    for r in range(gen.shape[0]):
        hits = np.flatnonzero(gen[r] == eos)
        stop = hits[0] + 1 if hits.size else n_new  # EOS itself is real, the rest is padding
        np.testing.assert_array_equal(got_t[r, 6:6 + stop], gen[r, :stop])
        assert (got_t[r, 6 + stop:] == eos).all()
        assert got_m[r, 6:6 + stop].all() and not got_m[r, 6 + stop:].any()


def test_greedy_matches_torch_generate():
    hf, cfg, params = _model("llama")
    toks, mask = _left_padded(cfg, [8, 3, 5, 1, 6], seed=3)
    n_new = 12
    with torch.no_grad():
        ref = hf.generate(
            input_ids=torch.tensor(toks, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
            pad_token_id=0, eos_token_id=None,
        ).numpy()
    got = np.asarray(generate_tokens(cfg, params, toks, mask, max_new_tokens=n_new))
    np.testing.assert_array_equal(got, ref)


def _sample(cfg, params, toks, mask, seed, n_new=12, top_k=3, temperature=1.0):
    return np.asarray(generate_tokens(
        cfg, params, toks, mask, max_new_tokens=n_new, rng=jax.random.key(seed), top_k=top_k,
        temperature=temperature,
    ))


def test_topk_sampling_seeded_and_within_topk():
    _, cfg, params = _model("gpt2")
    toks, mask = _left_padded(cfg, [5, 2, 4, 1], seed=4)
    t0, n_new, k = toks.shape[1], 12, 3
    a = _sample(cfg, params, toks, mask, seed=7)
    b = _sample(cfg, params, toks, mask, seed=7)
    c = _sample(cfg, params, toks, mask, seed=8)
    np.testing.assert_array_equal(a, b)
    raw_key = generate_tokens(cfg, params, toks, mask, max_new_tokens=n_new, rng=jax.random.PRNGKey(7),
                              top_k=k)
    np.testing.assert_array_equal(a, raw_key)  # a raw uint32 key is the same key
    assert (a[:, t0:] != c[:, t0:]).any()
    np.testing.assert_array_equal(a[:, :t0], toks)
    # recompute the no-cache logits over the sampled sequence: each token is in that step's top-k
    full_mask = np.concatenate([mask, np.ones((len(a), n_new), bool)], 1)
    logits = np.asarray(_logits(cfg, params, a, full_mask))
    for i in range(n_new):
        step = logits[:, t0 + i - 1]
        kth = np.sort(step, -1)[:, -k]
        chosen = np.take_along_axis(step, a[:, t0 + i][:, None], 1)[:, 0]
        assert (chosen >= kth - 1e-4).all(), f"step {i}: sampled token outside the top-{k}"
    # sampling, not greedy: some step picks a token that is not the argmax
    greedy = np.array([logits[:, t0 + i - 1].argmax(-1) for i in range(n_new)]).T
    assert (greedy != a[:, t0:]).any()


def test_topk_sampling_distribution():
    """First sampled token frequencies match softmax(logits / T) renormalised over the top-k."""
    _, cfg, params = _model("llama")
    n, k, temp = 2048, 4, 0.7
    toks, mask = _left_padded(cfg, [5], seed=5)
    logits = np.asarray(_logits(cfg, params, toks, mask))[0, -1].astype(np.float64) / temp
    top = np.argsort(logits)[::-1][:k]
    p = np.exp(logits[top] - logits[top].max())
    p /= p.sum()
    out = _sample(cfg, params, np.repeat(toks, n, 0), np.repeat(mask, n, 0), seed=11, n_new=1,
                  top_k=k, temperature=temp)[:, -1]
    assert np.isin(out, top).all()
    freq = np.array([(out == t).mean() for t in top])
    tol = 4.5 * np.sqrt(p * (1 - p) / n) + 1e-3
    assert (np.abs(freq - p) < tol).all(), (freq, p)


def test_sample_texts_total_length_convention():
    """Greedy sample_texts: prompt + (max_out_len - len(prompt)) tokens of the no-cache oracle."""
    tok = tiny_tokenizer(add_bos=True)
    _, cfg, params = _model("llama")
    prompts = ["The", "The capital", "Because I said", CORPUS_LONG]
    max_out_len = 16
    texts = sample_texts(cfg, params, tok, prompts, max_out_len=max_out_len, top_k=None, clean=False)
    ids = [tok(p)["input_ids"] for p in prompts]
    assert all(x[0] == tok.bos_token_id for x in ids)
    assert len(ids[3]) > max_out_len > len(ids[2])  # the long prompt gets no new token
    short = ids[:3]
    t0 = max(map(len, short))
    toks = np.array([[0] * (t0 - len(x)) + x for x in short], np.int32)
    mask = np.array([[0] * (t0 - len(x)) + [1] * len(x) for x in short], bool)
    want = _greedy_oracle(cfg, params, toks, mask, max_out_len - min(map(len, short)))
    for r, x in enumerate(short):
        cont = want[r, t0:t0 + max_out_len - len(x)].tolist()
        assert texts[r] == tok.decode(x + cont, skip_special_tokens=True)
    assert texts[3] == tok.decode(ids[3], skip_special_tokens=True)


def test_sample_texts_independent_of_batch_size():
    tok = tiny_tokenizer()
    _, cfg, params = _model("gptj")
    prompts = ["The", "Therefore", "Because", "I", "You", "The capital of"]
    a = sample_texts(cfg, params, tok, prompts, max_out_len=12, seed=3, batch_size=64)
    b = sample_texts(cfg, params, tok, prompts, max_out_len=12, seed=3, batch_size=3)
    assert a == b
    assert a != sample_texts(cfg, params, tok, prompts, max_out_len=12, seed=4)


def test_template_from_text():
    assert template_from_text("The {x} is}") == "The  x  is . {}"
    assert template_from_text("I") == "I. {}"


def test_context_templates_structure_and_braces():
    """A GPT-J whose LM-head bias favours "{" and "}": braces are sampled, then replaced."""
    tok = tiny_tokenizer()
    _, cfg, params = _model("gptj")
    brace = [tok.convert_tokens_to_ids(c) for c in ("{", "}")]
    assert None not in brace and tok.unk_token_id not in brace
    bias = params["lm_head"]["bias"].at[jnp.array(brace)].add(6.0)
    params = {**params, "lm_head": {**params["lm_head"], "bias": bias}}
    raw = sample_texts(cfg, params, tok, ["The", "You"], max_out_len=10, top_k=5, seed=0)
    assert any("{" in t or "}" in t for t in raw)  # precondition: braces were really sampled
    words = ("The", "Therefore", "Because", "I", "You")
    tpl = context_templates(cfg, params, tok, seed=0, n_per_prompt=2)
    assert tpl[0] == ["{}"] and len(tpl) == 2 and len(tpl[1]) == 2 * len(words)
    for j, t in enumerate(tpl[1]):
        assert t.startswith(words[j // 2]) and t.endswith(". {}")
        assert t.count("{") == 1 and t.count("}") == 1
        assert t.format("Danielle Darrieux").endswith(". Danielle Darrieux")
    assert tpl == context_templates(cfg, params, tok, seed=0, n_per_prompt=2)
    assert tpl != context_templates(cfg, params, tok, seed=1, n_per_prompt=2)


def test_context_templates_keep_bos_text():
    """skip_special_tokens=False keeps the literal BOS text (the AE Llama-3 quirk, docs/FORMULAS.md §R1)."""
    tok = tiny_tokenizer(add_bos=True)
    _, cfg, params = _model("llama")
    tpl = context_templates(cfg, params, tok, seed=0, skip_special_tokens=False)
    assert all(t.startswith("<s>") for t in tpl[1])
    plain = context_templates(cfg, params, tok, seed=0)
    assert [t[len("<s>"):] for t in tpl[1]] == plain[1]


def test_bad_inputs():
    _, cfg, params = _model("llama")
    toks, mask = _left_padded(cfg, [3, 2])
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate_tokens(cfg, params, toks, mask[:, ::-1], max_new_tokens=2)
    with pytest.raises(ValueError, match="no real token"):
        generate_tokens(cfg, params, toks, np.zeros_like(mask), max_new_tokens=2)
    with pytest.raises(ValueError, match="needs rng"):
        generate_tokens(cfg, params, toks, mask, max_new_tokens=2, top_k=5)
    with pytest.raises(ValueError, match="max_positions"):
        generate_tokens(cfg, params, toks, mask, max_new_tokens=cfg.max_positions)
