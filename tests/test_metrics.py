"""Scoring and metrics (docs/FORMULAS.md §8): hand-built logits, fake tokenizers (BOS / no BOS), float64
oracles for entropy / TF-IDF / F1 / MCC, and parity of the jitted scorer with torch transformers."""
from __future__ import annotations

import math
import re
from collections import Counter

import jax.numpy as jnp
import numpy as np
import pytest

from metake_jax.evaluate.classification import accuracy, matthews_corrcoef, weighted_f1
from metake_jax.evaluate.counterfact import apply_w_out_deltas, case_metrics, evaluate_counterfact, harmonic_mean
from metake_jax.evaluate.scoring import encode_pairs, score_pairs, target_logprobs, token_stats
from metake_jax.evaluate.text_metrics import TfidfModel, ngram_entropy, text_ngram_entropy, word_tokenize
from metake_jax.evaluate.zsre import evaluate_zsre
from metake_jax.requests import Case, EditRequest, NeighborPrompt, target_text
from models.interface import WDeltas
from tests.tiny import tiny_hf_model, tiny_tokenizer, to_jax

# ----------------------------------------------------------------------------- fake tokenizers


class SpaceTok:
    """GPT-2-like word pieces (``\\s?\\S+``), ids from a growing table; optional BOS."""

    def __init__(self, bos: int | None = None):
        self.bos = bos
        self.table: dict[str, int] = {}

    def piece_id(self, p: str) -> int:
        return self.table.setdefault(p, 10 + len(self.table))

    def __call__(self, text):
        if isinstance(text, list):
            return {"input_ids": [self(t)["input_ids"] for t in text]}
        ids = [self.piece_id(p) for p in re.findall(r"\s?\S+", text)]
        return {"input_ids": ([self.bos] if self.bos is not None else []) + ids}


class MergeTok:
    """Greedy longest match over {x, a, b, ab}: "xa" + "b" merges across the boundary."""

    vocab = {"ab": 4, "x": 1, "a": 2, "b": 3}

    def __call__(self, text):
        ids, i = [], 0
        while i < len(text):
            for piece in ("ab", "x", "a", "b"):
                if text.startswith(piece, i):
                    ids.append(self.vocab[piece])
                    i += len(piece)
                    break
            else:
                i += 1
        return {"input_ids": ids}


# ----------------------------------------------------------------------------- pure scoring math


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_token_stats_hand_built_logits():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 7)).astype(np.float32)
    tgt = np.array([[1, 2, 3, 0], [5, 0, 0, 0], [6, 6, 6, 6]])
    tmask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], bool)
    # make row 1 and row 2 argmax-correct everywhere they count
    logits[1, 0, 5] = 9.0
    logits[2, :, 6] = 9.0
    logits[0, 0, 1] = 9.0  # row 0: first token right, others random
    s, c, am = (np.asarray(x) for x in token_stats(jnp.asarray(logits), jnp.asarray(tgt), jnp.asarray(tmask)))
    lp = _np_log_softmax(logits)
    for b in range(3):
        k = tmask[b].sum()
        want = -sum(lp[b, j, tgt[b, j]] for j in range(k))
        assert s[b] == pytest.approx(want, rel=1e-5, abs=1e-6)
        assert c[b] == sum(int(np.argmax(logits[b, j]) == tgt[b, j]) for j in range(k))
        np.testing.assert_array_equal(am[b], logits[b].argmax(-1))
    assert c[1] == 1 and c[2] == 4  # all correct rows


@pytest.mark.parametrize("bos", [None, 1])
def test_encode_pairs_bos_handling(bos):
    tok = SpaceTok(bos)
    rows, starts = encode_pairs(tok, ["The capital of France is", "Paris is in"], [" Rome", " New York City"])
    pre0 = tok("The capital of France is")["input_ids"]
    assert rows[0][: len(pre0)] == pre0 and starts[0] == len(pre0)
    assert rows[0][starts[0]:] == [tok.piece_id(" Rome")]
    assert rows[1][starts[1]:] == [tok.piece_id(p) for p in (" New", " York", " City")]
    for r in rows:  # BOS exactly once, at the start, never in a target
        assert r.count(1) == (1 if bos is not None else 0)
        if bos is not None:
            assert r[0] == bos


def test_encode_pairs_boundary_merge_and_errors():
    rows, starts = encode_pairs(MergeTok(), ["xa"], ["b"])
    assert rows == [[1, 2, 3]] and starts == [2]  # prefix ids + target ids, not the merged "x ab"
    with pytest.raises(ValueError, match="adds no tokens"):
        encode_pairs(SpaceTok(), ["Paris is"], [" "])
    with pytest.raises(ValueError, match="empty prefix"):
        encode_pairs(SpaceTok(), [""], [" Paris"])
    with pytest.raises(ValueError, match="2 prefixes but 1 targets"):
        encode_pairs(SpaceTok(), ["a", "b"], [" c"])


def test_case_metrics_ties_are_failures_and_magnitudes():
    new = {"rewrite": np.array([1.0]), "paraphrase": np.array([0.5, 2.0, 1.5]), "neighborhood": np.array([1.0, 3.0])}
    true = {"rewrite": np.array([1.0]), "paraphrase": np.array([1.0, 1.0, 1.5]), "neighborhood": np.array([1.0, 2.0])}
    corr = {"rewrite": [True], "paraphrase": [True, False, False], "neighborhood": [False, True]}
    m = case_metrics(new, true, corr)
    assert m["rewrite_success"] == 0.0  # equal NLL: strict inequality fails
    assert m["paraphrase_success"] == pytest.approx(1 / 3)  # only 0.5 < 1.0; 1.5 == 1.5 fails
    assert m["neighborhood_success"] == pytest.approx(1 / 2)  # 2.0 < 3.0; tie fails
    want = np.mean([math.exp(-a) - math.exp(-b) for a, b in zip([0.5, 2.0, 1.5], [1.0, 1.0, 1.5])])
    assert m["paraphrase_magnitude"] == pytest.approx(want)
    want = np.mean([math.exp(-b) - math.exp(-a) for a, b in zip([1.0, 3.0], [1.0, 2.0])])
    assert m["neighborhood_magnitude"] == pytest.approx(want)
    assert m["paraphrase_acc"] == pytest.approx(1 / 3) and m["neighborhood_acc"] == 0.5
    assert harmonic_mean([50.0, 25.0, 100.0]) == pytest.approx(3 / (1 / 50 + 1 / 25 + 1 / 100))
    assert harmonic_mean([0.0, 10.0, 10.0]) == 0.0


# ----------------------------------------------------------------------------- text metrics


def _direct_entropy(text):
    toks = word_tokenize(text)
    total = 0.0
    for n, w in ((2, 2 / 3), (3, 4 / 3)):
        grams = Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))
        N = sum(grams.values())
        h = -sum(c / N * math.log(c / N, 2) for c in grams.values()) if N else 0.0
        total += w * h
    return total / 2


def test_ngram_entropy():
    distinct = "alpha beta gamma delta epsilon zeta eta theta"
    L = 8
    assert text_ngram_entropy(distinct) == pytest.approx(math.log2(L - 1) / 3 + 2 * math.log2(L - 2) / 3, abs=1e-12)
    assert text_ngram_entropy("go go go go go go") == 0.0
    assert text_ngram_entropy("one") == 0.0
    texts = ["The cat sat on the mat. The cat sat on the hat!",
             "Paris is the capital of France, and Paris is big; the capital is old.",
             "a b a b a b c"]
    for t in texts:
        assert text_ngram_entropy(t) == pytest.approx(_direct_entropy(t), abs=1e-12)
    assert ngram_entropy(texts) == pytest.approx(np.mean([_direct_entropy(t) for t in texts]), abs=1e-12)
    assert word_tokenize("Hello, world! It's well-known.") == ["Hello", ",", "world", "!", "It's", "well-known", "."]


def test_tfidf_against_hand_computation():
    vocab = {"paris": 0, "france": 1, "capital": 2, "rome": 3}
    idf = np.array([1.5, 2.0, 1.0, 3.0])
    m = TfidfModel(vocab, idf)
    a = "Paris paris, the capital of France."  # paris x2, capital x1, france x1 ("the", "of" not in vocab)
    b = "Rome is a capital. Capital!"  # rome x1, capital x2 ("is", "a" ignored)
    va = np.array([2 * 1.5, 1 * 2.0, 1 * 1.0, 0.0])
    vb = np.array([0.0, 0.0, 2 * 1.0, 1 * 3.0])
    np.testing.assert_allclose(m.vector(a), va)
    np.testing.assert_allclose(m.vector(b), vb)
    assert m.similarity(a, b) == pytest.approx(va @ vb / np.sqrt(va @ va) / np.sqrt(vb @ vb))
    assert m.similarity(a, "nothing known here") == 0.0
    with pytest.raises(ValueError, match="4 entries but idf has 3"):
        TfidfModel(vocab, idf[:3])


def test_f1_mcc_hand_values():
    t, p = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    tp, fn, fp, tn = 2, 1, 1, 1
    assert matthews_corrcoef(t, p) == pytest.approx((tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    f1_1, f1_0 = 2 * tp / (2 * tp + fp + fn), 2 * tn / (2 * tn + fn + fp)
    assert weighted_f1(t, p) == pytest.approx((3 * f1_1 + 2 * f1_0) / 5)
    assert accuracy(t, p) == pytest.approx(3 / 5)
    # multi-class with invalid (-1) predictions: -1 is a class with no support
    t, p = [0, 1, 2, 3, 0, 1], [0, 1, -1, -1, 1, 1]
    f1 = {0: 2 * 1 / (2 + 1), 1: 2 * 2 / (4 + 1), 2: 0.0, 3: 0.0}
    support = {0: 2, 1: 2, 2: 1, 3: 1}
    assert weighted_f1(t, p) == pytest.approx(sum(f1[k] * support[k] for k in f1) / 6)
    # MCC as the correlation of one-hot label matrices (Gorodkin), an independent formula
    labels = [-1, 0, 1, 2, 3]
    X = np.array([[x == k for k in labels] for x in t], float)
    Y = np.array([[y == k for k in labels] for y in p], float)
    cov = lambda A, B: ((A - A.mean(0)) * (B - B.mean(0))).sum()  # noqa: E731
    assert matthews_corrcoef(t, p) == pytest.approx(cov(X, Y) / math.sqrt(cov(X, X) * cov(Y, Y)))
    assert matthews_corrcoef([1, 1, 1], [1, 1, 1]) == 0.0  # zero denominator


# ----------------------------------------------------------------------------- torch parity


def _torch_nll(model, tok, prefix, target):
    import torch

    ids = tok(prefix + target)["input_ids"]
    P = len(tok(prefix)["input_ids"])
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    n = len(ids) - P
    nll = -sum(lp[P - 1 + j, ids[P + j]].item() for j in range(n)) / n
    correct = all(int(logits[P - 1 + j].argmax()) == ids[P + j] for j in range(n))
    return nll, correct, [int(logits[P - 1 + j].argmax()) for j in range(n)]


PAIRS = [
    ("The capital of France is", " Paris"), ("The capital of France is", " Berlin"),
    ("Apple was founded by", " Steve Jobs"), ("Danielle Darrieux speaks", " French and English"),
    ("Lyon is a twin city of", " Beirut"), ("Therefore, because I said so, you know that the language of Rome is",
                                           " Latin"), ("Michael Jordan plays", " basketball in Chicago"),
    ("The Eiffel Tower is located in", " Paris"), ("I", " said so"), ("Toko Yasuda plays the", " guitar"),
]


@pytest.mark.parametrize("family,bos", [("gpt2", False), ("llama", True)])
def test_scoring_matches_torch(family, bos):
    tok = tiny_tokenizer(add_bos=bos)
    model = tiny_hf_model(family)
    cfg, params = to_jax(model)
    pre, tgt = [p for p, _ in PAIRS], [t for _, t in PAIRS]
    s = score_pairs(cfg, params, tok, pre, tgt, batch_size=8)  # two buckets (8 rows + 2 rows padded to 8)
    nll, ok = target_logprobs(cfg, params, tok, pre, tgt, batch_size=8)
    for i, (p, t) in enumerate(PAIRS):
        want, want_ok, want_am = _torch_nll(model, tok, p, t)
        assert s.mean_nll[i] == pytest.approx(want, abs=2e-5), (i, p, t)
        assert nll[i] == pytest.approx(want, abs=2e-5)
        assert bool(s.all_correct[i]) == want_ok and bool(ok[i]) == want_ok
        assert s.argmax[i].tolist() == want_am
        assert s.n_tokens[i] == len(tok(p + t)["input_ids"]) - len(tok(p)["input_ids"])


def test_w_out_deltas_match_torch_weight_edit():
    import torch

    tok = tiny_tokenizer(add_bos=True)
    model = tiny_hf_model("llama")
    cfg, params = to_jax(model)
    rng = np.random.default_rng(1)
    delta = rng.normal(scale=0.5, size=(1, cfg.d_ff, cfg.d_model)).astype(np.float32)
    w = WDeltas((2,), jnp.asarray(delta))
    s = score_pairs(cfg, params, tok, [p for p, _ in PAIRS[:4]], [t for _, t in PAIRS[:4]], w_out_deltas=w)
    s2 = score_pairs(cfg, apply_w_out_deltas(params, w), tok, [p for p, _ in PAIRS[:4]], [t for _, t in PAIRS[:4]])
    np.testing.assert_allclose(s.mean_nll, s2.mean_nll, atol=1e-5)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight += torch.tensor(delta[0].T)
    for i, (p, t) in enumerate(PAIRS[:4]):
        assert s.mean_nll[i] == pytest.approx(_torch_nll(model, tok, p, t)[0], abs=2e-5)


def test_counterfact_and_zsre_end_to_end_vs_torch():
    tok = tiny_tokenizer(add_bos=True)
    model = tiny_hf_model("llama", seed=3)
    cfg, params = to_jax(model)
    cases = [
        Case(EditRequest(0, "France", "The capital of {} is", "Berlin", "Paris"), paraphrase_prompts=("France is",),
             neighborhood=(NeighborPrompt("The Eiffel Tower is located in", "Paris"),)),
        Case(EditRequest(1, "Apple", "{} was founded by", "Bill Gates", "Steve Jobs"),
             paraphrase_prompts=("The founder of Apple is", "Apple is"),
             neighborhood=(NeighborPrompt("Microsoft was founded by", "Bill Gates"),
                           NeighborPrompt("Lyon is a twin city of", "Beirut"))),
    ]
    r = evaluate_counterfact(cfg, params, tok, cases, batch_size=8)
    for c, pc in zip(cases, r["per_case"]):
        rq = c.request
        for sec, items in (("rewrite", [(rq.text, rq.target_true)]),
                           ("paraphrase", [(p, rq.target_true) for p in c.paraphrase_prompts]),
                           ("neighborhood", [(n.prompt, n.answer) for n in c.neighborhood])):
            new = [_torch_nll(model, tok, p, target_text(rq.target_new))[0] for p, _ in items]
            true = [_torch_nll(model, tok, p, target_text(a))[0] for p, a in items]
            np.testing.assert_allclose(pc[f"{sec}_nll_new"], new, atol=2e-5)
            np.testing.assert_allclose(pc[f"{sec}_nll_true"], true, atol=2e-5)
            cmp = [b < a for a, b in zip(new, true)] if sec == "neighborhood" else [b > a for a, b in zip(new, true)]
            assert pc[f"{sec}_success"] == pytest.approx(np.mean(cmp))
    assert r["summary"]["efficacy"] == pytest.approx(100 * np.mean([pc["rewrite_success"] for pc in r["per_case"]]))
    assert r["summary"]["consistency"] is None and r["summary"]["fluency"] is None

    z = [Case(EditRequest(5, "Danielle Darrieux", "The mother tongue of {} is", "French"), kind="zsre",
              paraphrase_prompts=("Danielle Darrieux speaks",),
              neighborhood=(NeighborPrompt("Michael Jordan plays?", "basketball in Chicago"),),
              loc="Michael Jordan plays", loc_ans="basketball in Chicago")]
    out = evaluate_zsre(cfg, params, tok, z, w_out_deltas=WDeltas((1,), jnp.zeros((1, cfg.d_ff, cfg.d_model))))
    pc = out["per_case"][0]
    for key, (p, t) in (("rewrite_acc", (z[0].request.text, " French")), ("paraphrase_acc", ("Danielle Darrieux speaks", " French")),
                        ("neighborhood_acc", ("Michael Jordan plays?", " basketball in Chicago"))):
        ids = tok(p + t)["input_ids"][len(tok(p)["input_ids"]):]
        am = _torch_nll(model, tok, p, t)[2]
        assert pc[key] == pytest.approx(np.mean([a == b for a, b in zip(am, ids)]))
    assert pc["neighborhood_pre_edit_acc"] == 1.0  # zero delta: post-edit argmax == pre-edit argmax


def test_fluency_uses_generations():
    tok = tiny_tokenizer(add_bos=False)
    cfg, params = to_jax(tiny_hf_model("gpt2"))
    cases = [Case(EditRequest(0, "France", "The capital of {} is", "Berlin", "Paris"), paraphrase_prompts=("France is",),
                  neighborhood=(NeighborPrompt("The Eiffel Tower is in", "Paris"),))]
    r = evaluate_counterfact(cfg, params, tok, cases, fluency=True, max_out_len=16, generation_seed=3)
    gen = r["per_case"][0]["generations"]
    assert len(gen) == 2 and gen[0].startswith("The capital of France is")
    assert r["per_case"][0]["fluency"] == pytest.approx(np.mean([_direct_entropy(g) for g in gen]), abs=1e-12)
    assert r["summary"]["fluency"] == pytest.approx(100 * r["per_case"][0]["fluency"])
    assert r["summary"]["consistency"] is None and "unavailable" in r["notes"]["consistency"]
    assert "no generation prompts" in r["notes"]["fluency_prompts"][0]
