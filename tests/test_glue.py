"""General-capability evaluation (docs/FORMULAS.md §R8): prompts, selection, prediction rules, torch parity."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from metake_jax.evaluate.classification import accuracy, matthews_corrcoef, weighted_f1
from metake_jax.evaluate.glue import TASKS, evaluate_glue, load_task, predict_from_nll, select_examples
from tests.tiny import tiny_hf_model, tiny_tokenizer, to_jax

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue_eval"

ONE = {
    "sst2": {"sentence": "a gripping story ", "label": 1, "idx": 0},
    "mrpc": {"sentence1": "A b.", "sentence2": "C d.", "label": 0, "idx": 1},
    "cola": {"sentence": "The jury convinced.", "label": 1, "idx": 2},
    "rte": {"sentence1": "Tibetans live in exile.", "sentence2": "Lama lives in exile.", "label": 1, "idx": 3},
    "nli": {"index": "7", "sentence1": "Turkey is calm.", "sentence2": "Turkey is at war.", "label": "not_entailment"},
    "mmlu": {"question": "Which is 4 x 9?", "subject": "math", "choices": ["36", "13", "49", "94"], "answer": 0},
}
# the reference's prompt strings (AlphaEdit glue_eval/*_eval.py, zero-shot), written out by hand
EXPECTED = {
    "sst2": "Review :a gripping story \nSentiment :",
    "mrpc": "Are the sentences paraphrases of each other.\nSentence 1: A b.\nSentence 2: C d.\nAnswer:",
    "cola": "Is this sentence linguistically acceptable?\nSentence: The jury convinced.\nAnswer: ",
    "rte": "Tibetans live in exile.\nquestion: Lama lives in exile. True or False?\nanswer:",
    "nli": "Turkey is calm. entails the Turkey is at war. True or False? Answer:",
    "mmlu": "Question: Which is 4 x 9?\n(A) 36\n(B) 13\n(C) 49\n(D) 94\nAnswer:",
}
LABELS = {"sst2": 1, "mrpc": 0, "cola": 1, "rte": 1, "nli": 0, "mmlu": 0}  # nli: not_entailment -> 0


def test_prompts_and_labels_exactly_as_reference(tmp_path):
    for name, rec in ONE.items():
        (tmp_path / TASKS[name].file).write_text(json.dumps([rec]))
        prompts, labels = load_task(TASKS[name], tmp_path)
        assert prompts == [EXPECTED[name]], name
        assert labels.tolist() == [LABELS[name]]
    assert [a for a, _ in TASKS["sst2"].candidates] == ["positive", "negative"]
    assert dict(TASKS["rte"].candidates) == {"True": 1, "False": 0}
    bad = dict(ONE["mmlu"], choices=["1", "2"])
    (tmp_path / "mmlu.json").write_text(json.dumps([ONE["mmlu"], bad]))
    with pytest.raises(ValueError, match="mmlu.json record 1: field 'choices'"):
        load_task(TASKS["mmlu"], tmp_path)
    (tmp_path / "nli.json").write_text(json.dumps([dict(ONE["nli"], label="neutral")]))
    with pytest.raises(ValueError, match="record 0: field 'label'"):
        load_task(TASKS["nli"], tmp_path)


def test_generation_parsing_rules():
    sst = TASKS["sst2"]
    assert sst.parse(sst.answer_text("Review :x\nSentiment :", " positive review")) == 1
    assert sst.parse(sst.answer_text("Review :x\nSentiment :", " meh")) == -1
    rte = TASKS["rte"]
    assert rte.parse(rte.answer_text("p\nanswer:", " false, true")) == 0  # 'false' is checked first
    mm = TASKS["mmlu"]
    assert mm.parse(mm.answer_text("Q\nAnswer:", " B\n(C)")) == 1


def test_select_examples():
    labels = np.array([0, 1] * 30 + [1] * 10)
    a = select_examples(labels, 20, seed=3)
    assert (a >= 10).all() and len(set(a.tolist())) == 20 and (np.diff(a) > 0).all()
    assert np.bincount(labels[a]).tolist() == [10, 10]
    np.testing.assert_array_equal(a, select_examples(labels, 20, seed=3))
    assert not np.array_equal(a, select_examples(labels, 20, seed=4))
    np.testing.assert_array_equal(select_examples(labels, 5, selection="reference"), np.arange(10, 15))
    with pytest.raises(ValueError, match="class 0 has"):
        select_examples(labels, 70, seed=0)


def test_predict_from_nll_rules():
    # binary: first candidate only if strictly more likely; ties go to the second
    nll = np.array([[0.1, 0.2], [0.3, 0.3], [0.5, 0.4]])
    assert predict_from_nll(nll, [1, 0]).tolist() == [1, 0, 0]
    # 4-way: strict maximum, else -1
    nll = np.array([[1.0, 0.5, 2.0, 3.0], [0.5, 0.5, 2.0, 3.0]])
    assert predict_from_nll(nll, [0, 1, 2, 3]).tolist() == [1, -1]


def test_missing_directory_is_skipped(tmp_path):
    with pytest.warns(UserWarning, match="GLUE evaluation skipped"):
        assert evaluate_glue(None, None, None, data_dir=tmp_path / "absent") is None


def _torch_mean_nll(model, tok, prefix, target):
    import torch

    ids = tok(prefix + target)["input_ids"]
    P = len(tok(prefix)["input_ids"])
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return -sum(lp[P - 1 + j, ids[P + j]].item() for j in range(len(ids) - P)) / (len(ids) - P)


def test_glue_tiny_model_vs_torch(tmp_path):
    import torch

    words = ["Paris is the capital", "Jobs founded Apple", "I said so", "Lyon is a twin city", "Rome is Latin",
             "the guitar and the piano", "Michael Jordan plays", "Islam and Christianity"]
    recs = [{"sentence": words[i % len(words)], "label": i % 2, "idx": i} for i in range(18)]
    (tmp_path / "sst2.json").write_text(json.dumps(recs))
    mm = [{"question": words[i % len(words)] + "?", "subject": "x", "choices": words[i % 4: i % 4 + 4],
           "answer": i % 4} for i in range(18)]
    (tmp_path / "mmlu.json").write_text(json.dumps(mm))
    tok = tiny_tokenizer(add_bos=False)
    model = tiny_hf_model("gpt2", seed=5)
    cfg, params = to_jax(model)
    out = evaluate_glue(cfg, params, tok, data_dir=tmp_path, tasks=("sst2", "mmlu"), n=6, seed=1, batch_size=8)
    r = out["tasks"]["sst2"]
    prompts, labels = load_task(TASKS["sst2"], tmp_path)
    want_preds = []
    for i in r["indices"]:
        pos, neg = (_torch_mean_nll(model, tok, prompts[i], " " + a) for a in ("positive", "negative"))
        want_preds.append(1 if np.exp(-pos) > np.exp(-neg) else 0)
    assert r["predictions_new"] == want_preds
    assert r["labels"] == labels[r["indices"]].tolist()
    assert r["f1_new"] == pytest.approx(weighted_f1(r["labels"], want_preds))
    assert r["mcc_new"] == pytest.approx(matthews_corrcoef(r["labels"], want_preds))
    assert r["accuracy_new"] == pytest.approx(accuracy(r["labels"], want_preds))
    for i, cont in zip(r["indices"], r["generations"]):  # greedy continuation == HF greedy generate
        ids = torch.tensor([tok(prompts[i])["input_ids"]])
        g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                           pad_token_id=tok.eos_token_id)
        assert cont == tok.decode(g[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    # MMLU (10 generated tokens, generated in the same batches as SST-2's 3) and its 4-way likelihood rule
    r = out["tasks"]["mmlu"]
    prompts, labels = load_task(TASKS["mmlu"], tmp_path)
    assert r["labels"] == labels[r["indices"]].tolist() and sorted(r["labels"]) == [0, 0, 1, 1, 2, 3]
    for i, cont, pred in zip(r["indices"], r["generations"], r["predictions_new"]):
        nll = np.array([[_torch_mean_nll(model, tok, prompts[i], " " + a) for a in "ABCD"]])
        assert pred == predict_from_nll(nll, [0, 1, 2, 3])[0]
        ids = torch.tensor([tok(prompts[i])["input_ids"]])
        g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                           pad_token_id=tok.eos_token_id)
        assert cont == tok.decode(g[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


@pytest.mark.skipif(not DATA.is_dir(), reason=f"GLUE data not found at {DATA}")
def test_real_glue_files_load():
    counts = {"sst2": 856, "mrpc": 258, "cola": 644, "rte": 262, "nli": 2489, "mmlu": 1516}  # PROVENANCE.md §5
    for name, n in counts.items():
        prompts, labels = load_task(TASKS[name], DATA)
        assert len(prompts) == len(labels) == n
        assert set(labels.tolist()) == set(lab for _, lab in TASKS[name].candidates)
        idx = select_examples(labels, 100, seed=0)
        k = len(TASKS[name].candidates)
        assert np.bincount(labels[idx], minlength=k).tolist() == [100 // k + (1 if c < 100 % k else 0) for c in range(k)]
