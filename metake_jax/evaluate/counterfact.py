"""CounterFact / MCF metrics (docs/FORMULAS.md §8, §R7).

Per case, every rewrite, paraphrase and neighborhood prompt is scored for two continuations —
``target_new`` and the answer (target_true, or a flat record's ``locality_ground_truth`` for its
locality prompt), each joined to the prompt by ``requests.join_target`` (the join Stage I trains
on) — in ONE batched pass over all cases (``scoring.score_pairs``).  Then, per case (averaged over its prompts) and over cases (×100):

* Efficacy       = mean [NLL_true > NLL_new] on the rewrite prompt (``post_rewrite_success``);
* Generalization = the same on paraphrase prompts;
* Specificity    = mean [NLL_true < NLL_new] on neighborhood prompts.
  Inequalities are STRICT: a tie (equal mean NLL) is not a success, as in the reference.
* Magnitudes (``*_magnitude``) = mean(exp(−NLL_new) − exp(−NLL_true)), sign reversed for
  neighbors; ``*_acc`` = teacher-forced argmax equals every token (new on rewrite/paraphrase,
  the answer on neighbors);
* ``score`` = harmonic mean of Efficacy, Generalization, Specificity.
* Fluency (optional) = mean over cases of the n-gram entropy of the case's generations (×100);
  generations come from ``models.generate.sample_texts`` (prompt + continuation, ``max_out_len``
  total tokens, top-k sampling with a seed).  Generation prompts: the record's
  ``generation_prompts`` (ROME format); the flat format has none, so the rewrite prompt and the
  paraphrase prompts are used instead and the output says so (``fluency_prompts``).
* Consistency = TF-IDF cosine between the joined generations and the joined attribute snippets of
  (relation_id, target_new id) — only when ``attribute_snippets.json``, ``idf.npy`` and
  ``tfidf_vocab.json`` are supplied and the cases carry those ids; otherwise it is reported as
  unavailable (None), never as 0.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from metake_jax.evaluate.scoring import score_pairs
from metake_jax.evaluate.text_metrics import TfidfModel, load_attribute_snippets, ngram_entropy
from metake_jax.requests import Case, join_target, prompt_text
from metake_jax.tokens import ChatFormat
from models.interface import WDeltas, with_w_out

__all__ = [
    "apply_w_out_deltas", "case_metrics", "counterfact_pairs", "evaluate_counterfact", "harmonic_mean", "summarize_cases",
    "ReferenceStats", "load_reference_stats",
]

_SECTIONS = ("rewrite", "paraphrase", "neighborhood")


class ReferenceStats:
    """TF-IDF model + attribute snippets for Consistency (ROME ``dsets`` files)."""

    def __init__(self, tfidf: TfidfModel, snippets: dict[str, dict[str, list[str]]]) -> None:
        self.tfidf = tfidf
        self.snippets = snippets


def load_reference_stats(path: str | Path | None) -> ReferenceStats | None:
    """Load ``attribute_snippets.json``, ``idf.npy``, ``tfidf_vocab.json`` from a directory.

    Returns None when ``path`` is None; a missing file raises FileNotFoundError naming it.
    """
    if path is None:
        return None
    d = Path(path)
    files = {n: d / n for n in ("attribute_snippets.json", "idf.npy", "tfidf_vocab.json")}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"consistency reference files missing: {missing}")
    return ReferenceStats(TfidfModel.from_files(files["idf.npy"], files["tfidf_vocab.json"]),
                          load_attribute_snippets(files["attribute_snippets.json"]))


def harmonic_mean(xs: Sequence[float]) -> float:
    """Harmonic mean; 0 if any value is 0 (scipy.stats.hmean convention for the reference)."""
    a = np.asarray(xs, dtype=np.float64)
    if (a < 0).any():
        raise ValueError(f"harmonic mean of negative values {a}")
    if (a == 0).any():
        return 0.0
    return float(len(a) / (1.0 / a).sum())


def case_metrics(nll_new: dict[str, np.ndarray], nll_true: dict[str, np.ndarray],
                 correct: dict[str, np.ndarray]) -> dict[str, Any]:
    """One case's metrics from per-prompt mean NLLs (keys: rewrite / paraphrase / neighborhood).

    ``correct[section]``: argmax-equals-every-token for the target that section tests (new for
    rewrite/paraphrase, the answer for neighborhood).  Fractions are in [0, 1]; None where a case
    has no prompt of that section.
    """
    out: dict[str, Any] = {}
    for sec in _SECTIONS:
        n, t = np.asarray(nll_new[sec], np.float64), np.asarray(nll_true[sec], np.float64)
        if n.size == 0:
            out[f"{sec}_success"] = out[f"{sec}_magnitude"] = out[f"{sec}_acc"] = None
            continue
        if sec == "neighborhood":
            success = t < n  # strict: ties fail
            mag = np.exp(-t) - np.exp(-n)
        else:
            success = t > n  # strict: ties fail
            mag = np.exp(-n) - np.exp(-t)
        out[f"{sec}_success"] = float(success.mean())
        out[f"{sec}_magnitude"] = float(mag.mean())
        out[f"{sec}_acc"] = float(np.asarray(correct[sec], bool).mean())
        out[f"{sec}_nll_new"] = n.tolist()
        out[f"{sec}_nll_true"] = t.tolist()
    return out


_SUMMARY_KEYS = {
    "efficacy": "rewrite_success", "generalization": "paraphrase_success", "specificity": "neighborhood_success",
    "efficacy_magnitude": "rewrite_magnitude", "generalization_magnitude": "paraphrase_magnitude",
    "specificity_magnitude": "neighborhood_magnitude", "efficacy_acc": "rewrite_acc",
    "generalization_acc": "paraphrase_acc", "specificity_acc": "neighborhood_acc",
}


def summarize_cases(per_case: list[dict[str, Any]]) -> dict[str, Any]:
    """Means (and stds) over cases, ×100, plus ``score`` = harmonic mean of Eff/Gen/Spe."""
    summary: dict[str, Any] = {"n_cases": len(per_case)}
    for name, key in _SUMMARY_KEYS.items():
        vals = np.array([c[key] for c in per_case if c.get(key) is not None], dtype=np.float64)
        summary[name] = float(vals.mean() * 100) if vals.size else None
        summary[name + "_std"] = float(vals.std() * 100) if vals.size else None
    parts = [summary["efficacy"], summary["generalization"], summary["specificity"]]
    summary["score"] = harmonic_mean(parts) if all(p is not None for p in parts) else None
    for name in ("fluency", "consistency"):
        vals = np.array([c[name] for c in per_case if c.get(name) is not None], dtype=np.float64)
        summary[name] = float(vals.mean() * 100) if vals.size else None
    return summary


def apply_w_out_deltas(params: Any, w_out_deltas: WDeltas | None) -> Any:
    """A param tree with the deltas added to the fc_out kernels (copies only that array)."""
    if w_out_deltas is None:
        return params
    return with_w_out(params, w_out_deltas.layers, w_out_deltas.delta, add=True)


def counterfact_pairs(cases: Sequence[Case], chat: ChatFormat | None = None) -> tuple[list[str], list[str], list[tuple]]:
    """(prefixes, continuations, slots) of every scored pair, joined by ``requests.join_target``
    (chat-wrapped with ``chat``, a ``tokens.ChatFormat``).  slots[i] = (case index, section,
    0 = target_new / 1 = the true answer, the record field of the prompt)."""
    prefixes: list[str] = []
    targets: list[str] = []
    slots: list[tuple[int, str, int, str]] = []
    for ci, c in enumerate(cases):
        r = c.request
        sec_prompts = {
            "rewrite": [(r.text, r.target_true, "prompt")],
            "paraphrase": [(p, r.target_true, f"paraphrase_prompts[{i}]") for i, p in enumerate(c.paraphrase_prompts)],
            "neighborhood": [(nb.prompt, nb.answer, f"neighborhood[{i}]") for i, nb in enumerate(c.neighborhood)],
        }
        for sec, items in sec_prompts.items():
            for p, ans, field in items:
                for which, tgt in ((0, r.target_new), (1, ans)):
                    prefix, cont = join_target(p, tgt, chat)
                    prefixes.append(prefix)
                    targets.append(cont)
                    slots.append((ci, sec, which, field))
    return prefixes, targets, slots


def _fluency_prompts(case: Case, chat: ChatFormat | None = None) -> tuple[list[str], str]:
    """Generation prompts as the model reads them (``requests.prompt_text``: chat-wrapped, no trailing space)."""
    if case.generation_prompts:
        prompts, src = list(case.generation_prompts), "generation_prompts"
    else:
        prompts, src = [case.request.text, *case.paraphrase_prompts], "rewrite+paraphrase prompts (no generation prompts)"
    return [prompt_text(p, chat) for p in prompts], src


def evaluate_counterfact(
    cfg: Any,
    params: Any,
    tokenizer: Any,
    cases: Sequence[Case],
    *,
    batch_size: int = 32,
    w_out_deltas: WDeltas | None = None,
    fluency: bool = False,
    generation_seed: int = 0,
    max_out_len: int = 100,
    top_k: int | None = 5,
    reference_stats: ReferenceStats | str | Path | None = None,
    chat: ChatFormat | None = None,
) -> dict[str, Any]:
    """Score ``cases`` (kind "counterfact") on a model; returns {"summary", "per_case", notes}.

    ``chat``: a ``tokens.ChatFormat`` — every prompt (rewrite, paraphrase, neighborhood,
    generation) is wrapped in the tokenizer's chat template and the targets are its answers."""
    cases = list(cases)
    for c in cases:
        if c.kind != "counterfact" or c.request.target_true is None:
            raise ValueError(f"case {c.case_id}: evaluate_counterfact needs CounterFact cases with target_true")
    prefixes, targets, slots = counterfact_pairs(cases, chat)
    s = score_pairs(cfg, params, tokenizer, prefixes, targets, batch_size=batch_size, w_out_deltas=w_out_deltas)
    acc: list[dict[str, dict[str, list]]] = [
        {k: {sec: [] for sec in _SECTIONS} for k in ("new", "true", "cnew", "ctrue")} for _ in cases]
    for (ci, sec, which, _), nll, ok in zip(slots, s.mean_nll, s.all_correct):
        a = acc[ci]
        a["new" if which == 0 else "true"][sec].append(float(nll))
        a["cnew" if which == 0 else "ctrue"][sec].append(bool(ok))
    per_case = []
    for c, a in zip(cases, acc):
        correct = {"rewrite": a["cnew"]["rewrite"], "paraphrase": a["cnew"]["paraphrase"],
                   "neighborhood": a["ctrue"]["neighborhood"]}
        m = case_metrics({k: np.array(v) for k, v in a["new"].items()},
                         {k: np.array(v) for k, v in a["true"].items()}, correct)
        m["case_id"] = c.case_id
        per_case.append(m)

    notes: dict[str, Any] = {}
    if fluency:
        from models.generate import sample_texts  # lazy: generation is optional

        prompt_lists = [_fluency_prompts(c, chat) for c in cases]
        flat = [p for ps, _ in prompt_lists for p in ps]
        gparams = apply_w_out_deltas(params, w_out_deltas)
        texts = sample_texts(cfg, gparams, tokenizer, flat, max_out_len=max_out_len, top_k=top_k,
                             seed=generation_seed, batch_size=max(batch_size, 8))
        stats = reference_stats
        if stats is not None and not isinstance(stats, ReferenceStats):
            stats = load_reference_stats(stats)
        pos = 0
        n_cons_missing = 0
        for m, c, (ps, _) in zip(per_case, cases, prompt_lists):
            gen = texts[pos : pos + len(ps)]
            pos += len(ps)
            m["fluency"] = ngram_entropy(gen)
            m["generations"] = gen
            m["consistency"] = None
            if stats is not None:
                snip = stats.snippets.get(c.relation_id or "", {}).get(c.target_new_id or "")
                if snip:
                    m["consistency"] = stats.tfidf.similarity(" ".join(gen), " ".join(snip))
                else:
                    n_cons_missing += 1
        notes["fluency_prompts"] = sorted({src for _, src in prompt_lists})
        notes["fluency_generation"] = dict(max_out_len=max_out_len, top_k=top_k, seed=generation_seed)
        if stats is None:
            notes["consistency"] = "unavailable: attribute_snippets.json / idf.npy / tfidf_vocab.json not supplied"
        elif n_cons_missing:
            notes["consistency"] = (f"{n_cons_missing} case(s) without relation_id/target_new id snippets "
                                    f"were left out of the mean")
    else:
        notes["fluency"] = "not computed (fluency=False)"
        notes["consistency"] = "not computed (needs generations: fluency=True)"
    summary = summarize_cases(per_case)
    return {"summary": summary, "per_case": per_case, "notes": notes}
