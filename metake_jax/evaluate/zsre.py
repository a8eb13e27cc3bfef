"""ZsRE metrics: token-level teacher-forced top-1 accuracy (docs/FORMULAS.md §8, §R7 ZsRE).

For each case, in ONE batched pass (``scoring.score_pairs``):

* Efficacy       — prefix = src (the filled template), target = answers[0] (``join_target``): the
  fraction of target tokens whose teacher-forced argmax equals the token;
* Generalization — the same on ``rephrase``;
* Specificity    — prefix = ``loc + "?"``, target = ``" " + loc_ans`` (the reference neighborhood:
  prompt ``loc + "?" + decode(ans[:i])``, target ``ans[i]`` for the tokens of ``" " + loc_ans``).
  Two conventions are provided:
  - ``specificity`` (REPORTED BY DEFAULT, the MEMIT/AlphaEdit tables' ``post_neighborhood_acc``):
    per-token argmax equals the ``loc_ans`` tokens;
  - ``specificity_pre_edit``: per-token agreement of the argmax with the pre-edit model's argmax at
    the same positions (docs/FORMULAS.md §8 "agreement with the pre-edit top-1 tokens").  Computed when
    the pre-edit predictions are available: pass ``pre_edit_argmax`` (from
    ``neighborhood_argmax`` on the unedited model), or pass ``w_out_deltas`` — then the pre-edit
    model is ``params`` without the deltas and it is scored in the same call.

The reference re-tokenizes each prefix ``prompt + decode(target[:i])``; teacher forcing on the
tokens of ``prompt + target`` gives the same inputs whenever BPE does not merge across the
boundary (the usual case; see ``scoring`` for the boundary rule).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from metake_jax.evaluate.scoring import PairScores, score_pairs
from metake_jax.requests import Case, join_target
from metake_jax.tokens import ChatFormat
from models.interface import WDeltas

__all__ = ["evaluate_zsre", "neighborhood_argmax", "zsre_pairs"]


def zsre_pairs(cases: Sequence[Case], chat: ChatFormat | None = None) -> tuple[list[str], list[str], list[tuple[int, str, str]]]:
    """(prefixes, continuations, (case index, section, record field)) for every scored pair,
    joined by ``requests.join_target`` (chat-wrapped with ``chat``, a ``tokens.ChatFormat``)."""
    prefixes, targets, slots = [], [], []
    for ci, c in enumerate(cases):
        if c.kind != "zsre":
            raise ValueError(f"case {c.case_id}: evaluate_zsre needs ZsRE cases, got kind {c.kind!r}")
        tgt = c.request.target_new
        items = [("rewrite", c.request.text, tgt, "prompt")]
        items += [("paraphrase", p, tgt, f"paraphrase_prompts[{i}]") for i, p in enumerate(c.paraphrase_prompts)]
        items += [("neighborhood", nb.prompt, nb.answer, f"neighborhood[{i}]") for i, nb in enumerate(c.neighborhood)]
        for sec, p, t, field in items:
            prefix, cont = join_target(p, t, chat)
            prefixes.append(prefix)
            targets.append(cont)
            slots.append((ci, sec, field))
    return prefixes, targets, slots


def neighborhood_argmax(cfg: Any, params: Any, tokenizer: Any, cases: Sequence[Case], *, batch_size: int = 32,
                        w_out_deltas: WDeltas | None = None, chat: ChatFormat | None = None) -> list[list[np.ndarray]]:
    """Per case, per neighborhood prompt: the model's argmax ids at the loc_ans positions."""
    prefixes, targets, slots = zsre_pairs(cases, chat)
    keep = [i for i, (_, sec, _) in enumerate(slots) if sec == "neighborhood"]
    s = score_pairs(cfg, params, tokenizer, [prefixes[i] for i in keep], [targets[i] for i in keep],
                    batch_size=batch_size, w_out_deltas=w_out_deltas)
    out: list[list[np.ndarray]] = [[] for _ in cases]
    for j, i in enumerate(keep):
        out[slots[i][0]].append(s.argmax[j])
    return out


def _token_acc(bools: list[np.ndarray]) -> float | None:
    if not bools:
        return None
    return float(np.concatenate(bools).mean())


def evaluate_zsre(
    cfg: Any,
    params: Any,
    tokenizer: Any,
    cases: Sequence[Case],
    *,
    batch_size: int = 32,
    w_out_deltas: WDeltas | None = None,
    pre_edit_argmax: list[list[np.ndarray]] | None = None,
    chat: ChatFormat | None = None,
) -> dict[str, Any]:
    """Score ZsRE cases; returns {"summary": ×100 means/stds, "per_case": fractions, "notes"}.

    ``chat``: a ``tokens.ChatFormat`` wrapping every prompt in the tokenizer's chat template."""
    cases = list(cases)
    prefixes, targets, slots = zsre_pairs(cases, chat)
    s: PairScores = score_pairs(cfg, params, tokenizer, prefixes, targets, batch_size=batch_size,
                                w_out_deltas=w_out_deltas)
    if pre_edit_argmax is None and w_out_deltas is not None:
        pre_edit_argmax = neighborhood_argmax(cfg, params, tokenizer, cases, batch_size=batch_size, chat=chat)
    per: list[dict[str, list[np.ndarray]]] = [
        {"rewrite": [], "paraphrase": [], "neighborhood": [], "neighborhood_pre": []} for _ in cases]
    nb_seen = [0] * len(cases)
    for j, (ci, sec, _) in enumerate(slots):
        am, tgt = s.argmax[j], np.asarray(s.target_ids[j])
        per[ci][sec].append(am == tgt)
        if sec == "neighborhood" and pre_edit_argmax is not None:
            pre = np.asarray(pre_edit_argmax[ci][nb_seen[ci]])
            if pre.shape != am.shape:
                raise ValueError(f"case {cases[ci].case_id}: pre-edit argmax has {pre.shape[0]} tokens, "
                                 f"expected {am.shape[0]}")
            per[ci]["neighborhood_pre"].append(am == pre)
            nb_seen[ci] += 1
    per_case = []
    for c, p in zip(cases, per):
        per_case.append({
            "case_id": c.case_id,
            "rewrite_acc": _token_acc(p["rewrite"]),
            "paraphrase_acc": _token_acc(p["paraphrase"]),
            "neighborhood_acc": _token_acc(p["neighborhood"]),
            "neighborhood_pre_edit_acc": _token_acc(p["neighborhood_pre"]),
        })
    summary: dict[str, Any] = {"n_cases": len(cases)}
    for name, key in (("efficacy", "rewrite_acc"), ("generalization", "paraphrase_acc"),
                      ("specificity", "neighborhood_acc"), ("specificity_pre_edit", "neighborhood_pre_edit_acc")):
        vals = np.array([r[key] for r in per_case if r[key] is not None], dtype=np.float64)
        summary[name] = float(vals.mean() * 100) if vals.size else None
        summary[name + "_std"] = float(vals.std() * 100) if vals.size else None
    notes = {"specificity": "token-level top-1 accuracy on loc_ans tokens (reference post_neighborhood_acc); "
                            "specificity_pre_edit = agreement with the pre-edit model's top-1 tokens"
                            + ("" if pre_edit_argmax is not None else " (not computed: no pre-edit predictions)")}
    return {"summary": summary, "per_case": per_case, "notes": notes}
