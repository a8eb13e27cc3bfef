"""General-capability evaluation: SST-2, MRPC, CoLA, RTE, NLI, MMLU zero-shot (docs/FORMULAS.md §R8).

Data: the JSON conversions of the AlphaEdit/EMMET ``glue_eval/dataset/*.pkl`` subsets, read from a
directory (default ``<repo>/../shared/data/glue_eval``).  A missing directory skips the whole
evaluation with a warning (``evaluate_glue`` returns None).

Selection per task (``select_examples``): ``"balanced"`` (default) — a seeded class-balanced
subset of ``n`` examples drawn from items [10:] (items [0:10] are the reference's few-shot
reserve); ``"reference"`` — items [10:10+n] as the reference takes them.

Prompts, answers and label mappings are exactly the reference's (zero-shot), including RTE's
"True" <-> label 1 (which is *not_entailment* in GLUE RTE — an inversion the reference has).

Two scorings:
1. ``f1_new`` (likelihood): for each candidate answer a, mean NLL of ``" " + a`` after the prompt
   (text ``prompt + " " + a``, as the reference's ``f"{prompt} {a}"``), all candidates of all
   examples in one batched pass (``scoring.score_pairs``).  Prediction = the candidate with larger
   exp(−mean NLL): binary tasks pick the first candidate only if it is strictly more likely (else
   the second, as the reference); MMLU needs a strict maximum, otherwise −1 (invalid).
2. ``f1`` (generation, ``generation=True``): greedy continuation of ``gen_len`` tokens
   (reference lengths: 3, or 10 for CoLA/MMLU) with ``models.generate.generate`` over left-padded
   batches, parsed with the reference's string rules; unparseable -> −1.
Both report accuracy, weighted F1 and MCC (``classification``, numpy).
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from metake_jax.evaluate.classification import accuracy, matthews_corrcoef, weighted_f1
from metake_jax.evaluate.scoring import score_pairs
from metake_jax.requests import target_text
from models.interface import WDeltas

__all__ = ["DEFAULT_GLUE_DIR", "TASKS", "GlueTask", "evaluate_glue", "load_task", "predict_from_nll", "select_examples"]

DEFAULT_GLUE_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "glue_eval"
FEW_SHOT_RESERVE = 10


def _need(rec: Any, key: str, where: str) -> Any:
    if not isinstance(rec, dict) or key not in rec:
        raise ValueError(f"{where}: missing field {key!r}")
    return rec[key]


def _s(rec: Any, key: str, where: str) -> str:
    v = _need(rec, key, where)
    if not isinstance(v, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    return v


def _int_label(rec: Any, where: str, n: int = 2) -> int:
    v = _need(rec, "label", where)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n:
        raise ValueError(f"{where}: field 'label' must be an int in [0, {n}), got {v!r}")
    return v


def _mmlu_prompt(r: dict, w: str) -> str:
    ch = _need(r, "choices", w)
    if not isinstance(ch, list) or len(ch) != 4 or not all(isinstance(c, str) for c in ch):
        raise ValueError(f"{w}: field 'choices' must be a list of 4 strings")
    return ("Question: " + _s(r, "question", w) + "\n" + "".join(f"({k}) {c}\n" for k, c in zip("ABCD", ch))
            + "Answer:")


def _mmlu_label(r: dict, w: str) -> int:
    v = _need(r, "answer", w)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 4:
        raise ValueError(f"{w}: field 'answer' must be an int in [0, 4), got {v!r}")
    return v


def _nli_label(r: dict, w: str) -> int:
    v = _s(r, "label", w)
    if v not in ("entailment", "not_entailment"):
        raise ValueError(f"{w}: field 'label' must be 'entailment' or 'not_entailment', got {v!r}")
    return 1 if v == "entailment" else 0


def _after(marker: str) -> Callable[[str, str], str]:
    return lambda prompt, cont: (prompt + cont).split(marker)[-1].strip()


def _rule(pairs: Sequence[tuple[str, int]]) -> Callable[[str], int]:
    def parse(text: str) -> int:
        low = text.lower()
        for word, label in pairs:
            if word in low:
                return label
        return -1
    return parse


@dataclasses.dataclass(frozen=True)
class GlueTask:
    name: str
    file: str
    prompt: Callable[[dict, str], str]
    label: Callable[[dict, str], int]
    candidates: tuple[tuple[str, int], ...]  # (answer text, label), in the reference's order
    gen_len: int
    answer_text: Callable[[str, str], str]  # (prompt, continuation) -> text the parser reads
    parse: Callable[[str], int]


TASKS: dict[str, GlueTask] = {
    "sst2": GlueTask(
        "sst2", "sst2.json", lambda r, w: "Review :" + _s(r, "sentence", w) + "\nSentiment :",
        lambda r, w: _int_label(r, w), (("positive", 1), ("negative", 0)), 3,
        _after("Sentiment :"), _rule((("positive", 1), ("negative", 0)))),
    "mrpc": GlueTask(
        "mrpc", "mrpc.json",
        lambda r, w: ("Are the sentences paraphrases of each other.\n" + "Sentence 1: " + _s(r, "sentence1", w)
                      + "\n" + "Sentence 2: " + _s(r, "sentence2", w) + "\n" + "Answer:"),
        lambda r, w: _int_label(r, w), (("Yes", 1), ("No", 0)), 3,
        _after("Answer:"), _rule((("yes", 1), ("no", 0)))),
    "cola": GlueTask(
        "cola", "cola.json",
        lambda r, w: "Is this sentence linguistically acceptable?\n" + "Sentence: " + _s(r, "sentence", w) + "\n"
        + "Answer: ",
        lambda r, w: _int_label(r, w), (("Yes", 1), ("No", 0)), 10,
        _after("Answer:"), _rule((("yes", 1), ("no", 0)))),
    "rte": GlueTask(
        "rte", "rte.json",
        lambda r, w: _s(r, "sentence1", w) + "\n" + "question: " + _s(r, "sentence2", w) + " True or False?" + "\n"
        + "answer:",
        lambda r, w: _int_label(r, w), (("True", 1), ("False", 0)), 3,
        _after("answer:"), _rule((("false", 0), ("true", 1)))),
    "nli": GlueTask(
        "nli", "nli.json",
        lambda r, w: f'{_s(r, "sentence1", w)} entails the {_s(r, "sentence2", w)} True or False? Answer:',
        _nli_label, (("True", 1), ("False", 0)), 3,
        _after("True or False? Answer:"), _rule((("true", 1), ("false", 0)))),
    "mmlu": GlueTask(
        "mmlu", "mmlu.json", _mmlu_prompt, _mmlu_label, (("A", 0), ("B", 1), ("C", 2), ("D", 3)), 10,
        lambda prompt, cont: cont, _rule((("a\n", 0), ("b\n", 1), ("c\n", 2), ("d\n", 3)))),
}


def load_task(task: GlueTask, data_dir: str | Path) -> tuple[list[str], np.ndarray]:
    """All (prompt, label) of a task file; errors name the file, record index and field."""
    path = Path(data_dir) / task.file
    if not path.exists():
        raise FileNotFoundError(f"GLUE task {task.name!r}: file not found: {path}")
    recs = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(recs, list) or not recs:
        raise ValueError(f"{path}: expected a non-empty list of records")
    prompts, labels = [], []
    for i, r in enumerate(recs):
        w = f"{path.name} record {i}"
        if not isinstance(r, dict):
            raise ValueError(f"{w}: record must be an object, got {type(r).__name__}")
        prompts.append(task.prompt(r, w))
        labels.append(task.label(r, w))
    return prompts, np.asarray(labels, dtype=np.int64)


def select_examples(labels: np.ndarray, n: int | None, *, seed: int = 0, selection: str = "balanced",
                    reserve: int = FEW_SHOT_RESERVE) -> np.ndarray:
    """Indices of the evaluated examples (see module docstring), in file order."""
    total = len(labels)
    if n is None:
        return np.arange(reserve, total)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if selection == "reference":
        if reserve + n > total:
            raise ValueError(f"asked for {n} examples after the {reserve} reserved, only {total - reserve} exist")
        return np.arange(reserve, reserve + n)
    if selection != "balanced":
        raise ValueError(f"selection must be 'balanced' or 'reference', got {selection!r}")
    rng = np.random.default_rng(seed)
    pool = np.arange(reserve, total)
    classes = np.unique(labels[pool])
    per = [n // len(classes) + (1 if k < n % len(classes) else 0) for k in range(len(classes))]
    picked = []
    for cls, m in zip(classes, per):
        cand = pool[labels[pool] == cls]
        if m > cand.size:
            raise ValueError(f"class {cls} has {cand.size} examples, {m} needed for a balanced subset of {n}")
        picked.append(rng.choice(cand, size=m, replace=False))
    return np.sort(np.concatenate(picked))


def predict_from_nll(nll: np.ndarray, cand_labels: Sequence[int]) -> np.ndarray:
    """nll (n_examples, n_candidates) mean NLLs -> predicted labels (reference rules, see docstring)."""
    p = np.exp(-np.asarray(nll, dtype=np.float64))
    lab = np.asarray(cand_labels)
    if p.shape[1] == 2:
        return np.where(p[:, 0] > p[:, 1], lab[0], lab[1])
    best = p.argmax(1)
    unique = (p == p.max(1, keepdims=True)).sum(1) == 1
    return np.where(unique, lab[best], -1)


def _metrics(labels: np.ndarray, preds: np.ndarray) -> dict[str, float]:
    return {"accuracy": accuracy(labels, preds), "f1": weighted_f1(labels, preds),
            "mcc": matthews_corrcoef(labels, preds)}


def _generate_continuations(cfg: Any, params: Any, tokenizer: Any, prompts: Sequence[str], gen_lens: Sequence[int],
                            batch_size: int) -> list[str]:
    """Greedy continuations of ``gen_lens[i]`` tokens for every prompt of every task at once.

    Greedy decoding is prefix-consistent, so all prompts run to ``max(gen_lens)`` new tokens in
    length-sorted batches (few compiled shapes) and each is cut to its own task's length.
    """
    from models.generate import generate, host_array  # lazy: only for generation scoring

    ids = [list(x) for x in tokenizer(list(prompts))["input_ids"]]
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (getattr(tokenizer, "eos_token_id", None) or 0)
    out: list[str] = [""] * len(ids)
    order = np.argsort([len(x) for x in ids], kind="stable")
    for b0 in range(0, len(ids), batch_size):
        idx = order[b0 : b0 + batch_size]
        t0 = max(len(ids[i]) for i in idx)
        toks = np.full((len(idx), t0), pad, np.int32)
        mask = np.zeros((len(idx), t0), bool)
        for r, i in enumerate(idx):
            toks[r, t0 - len(ids[i]):] = ids[i]
            mask[r, t0 - len(ids[i]):] = True
        g = host_array(generate(cfg, params, toks, mask, max_new_tokens=max(gen_lens), top_k=None).tokens)[:, t0:]
        for r, i in enumerate(idx):
            out[i] = tokenizer.decode(g[r, : gen_lens[i]].tolist(), skip_special_tokens=True)
    return out


def evaluate_glue(
    cfg: Any,
    params: Any,
    tokenizer: Any,
    *,
    data_dir: str | Path | None = None,
    tasks: Sequence[str] = ("sst2", "mrpc", "cola", "rte", "nli", "mmlu"),
    n: int | None = 100,
    seed: int = 0,
    selection: str = "balanced",
    batch_size: int = 16,
    generation: bool = True,
    w_out_deltas: WDeltas | None = None,
) -> dict[str, Any] | None:
    """Per-task {accuracy, f1, mcc} for likelihood (``*_new``) and generation scoring; None if no data."""
    d = Path(data_dir) if data_dir is not None else DEFAULT_GLUE_DIR
    if not d.is_dir():
        warnings.warn(f"GLUE evaluation skipped: data directory {d} not found (pass data_dir=...)", stacklevel=2)
        return None
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown GLUE task(s) {unknown}; known: {sorted(TASKS)}")
    chosen = {}
    prefixes, targets = [], []
    for name in tasks:
        task = TASKS[name]
        prompts, labels = load_task(task, d)
        idx = select_examples(labels, n, seed=seed, selection=selection)
        chosen[name] = ([prompts[i] for i in idx], labels[idx], idx)
        for p in chosen[name][0]:
            for ans, _ in task.candidates:
                prefixes.append(p)
                targets.append(target_text(ans))  # reference text: f"{prompt} {answer}"
    s = score_pairs(cfg, params, tokenizer, prefixes, targets, batch_size=batch_size, w_out_deltas=w_out_deltas)
    gparams = params
    if generation and w_out_deltas is not None:
        from metake_jax.evaluate.counterfact import apply_w_out_deltas

        gparams = apply_w_out_deltas(params, w_out_deltas)
    conts: list[str] = []
    if generation:
        all_prompts = [p for name in tasks for p in chosen[name][0]]
        gen_lens = [TASKS[name].gen_len for name in tasks for _ in chosen[name][0]]
        conts = _generate_continuations(cfg, gparams, tokenizer, all_prompts, gen_lens, batch_size)
    results: dict[str, Any] = {}
    pos = 0
    gpos = 0
    for name in tasks:
        task = TASKS[name]
        prompts, labels, idx = chosen[name]
        k = len(task.candidates)
        nll = s.mean_nll[pos : pos + k * len(prompts)].reshape(len(prompts), k)
        pos += k * len(prompts)
        preds_new = predict_from_nll(nll, [lab for _, lab in task.candidates])
        m_new = _metrics(labels, preds_new)
        r: dict[str, Any] = {"n": int(len(labels)), "indices": idx.tolist(), "labels": labels.tolist(),
                             "predictions_new": preds_new.tolist(), "accuracy_new": m_new["accuracy"],
                             "f1_new": m_new["f1"], "mcc_new": m_new["mcc"]}
        if generation:
            tc = conts[gpos : gpos + len(prompts)]
            gpos += len(prompts)
            preds = np.array([task.parse(task.answer_text(p, c)) for p, c in zip(prompts, tc)], dtype=np.int64)
            m = _metrics(labels, preds)
            r.update(predictions=preds.tolist(), invalid=int((preds == -1).sum()), accuracy=m["accuracy"],
                     f1=m["f1"], mcc=m["mcc"], generations=tc)
        results[name] = r
    return {"tasks": results, "data_dir": str(d), "selection": selection, "seed": seed,
            "scoring": "likelihood (f1_new)" + (" + greedy generation (f1)" if generation else "")}
