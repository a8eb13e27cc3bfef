"""Tokenized, padded inputs for one edit batch (docs/FORMULAS.md §2–§3).

Every request contributes one row per context template (its rewriting prompts: template-filled
prompt followed by the target tokens except the last) and one KL row (``"{subject} is a"``).
The same rows give the keys (§2: read at the subject's last token, which causal attention makes
independent of the appended target tokens), the Stage I loss (§3) and the MetaKE edit/locality
losses (§6).  Requests are padded to a static bucket; padded requests are copies of the last one
and are masked out by ``valid`` (their key and residual columns are zeroed before any solve).

Prompt and target are joined by ``requests.join_target`` and tokenized by ``tokens.encode_pairs``
— the rule the benchmark scores use — and the subject's last token is read from the offset
mapping (``tokens.subject_last_index``).  In chat mode (``chat``, a ``tokens.ChatFormat``) each
rewriting prompt (context template filled with the request's prompt) is wrapped in the chat
template; the KL prompt is not (it regularizes the subject's own representation).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

from metake_jax.errors import RequestError
from metake_jax.requests import check_conflicts, check_request, join_target, prompt_text
from metake_jax.tokens import (
    ChatFormat, bucket, bucket_requests, encode, encode_pairs, fill, pad_id, pad_right, subject_last_index,
)

KL_TEMPLATE = "{} is a"


class EditBatch(NamedTuple):
    """Arrays (numpy or jax) for ``n_pad`` requests × ``rows_per_req`` rows.

    tokens, mask:   (R, T)   right-padded rows, R = n_pad * rows_per_req
    lookup:         (R,)     subject-last index of each row
    tgt_pos:        (R, Tt)  positions whose logits predict the target tokens
    tgt_ids:        (R, Tt)  target token ids; tgt_mask (R, Tt) marks real ones
    key_avg:        (n_pad, R)  template-group averaging weights (½·"{}" + ½·mean of the rest)
    nll_avg:        (n_pad, R)  uniform mean over a request's rewriting rows
    kl_sel:         (n_pad, R)  one-hot of each request's KL row
    bare_row:       (n_pad,)    row index of the bare prompt (template "{}")
    valid:          (n_pad,)    1.0 for real requests, 0.0 for padding
    """

    tokens: Any
    mask: Any
    lookup: Any
    tgt_pos: Any
    tgt_ids: Any
    tgt_mask: Any
    key_avg: Any
    nll_avg: Any
    kl_sel: Any
    bare_row: Any
    valid: Any


def template_weights(templates: Sequence[Sequence[str]]) -> tuple[list[str], np.ndarray]:
    """Flatten template groups; weight = 1/n_groups · 1/len(group) (docs/FORMULAS.md §2)."""
    flat, w = [], []
    groups = [g for g in templates if len(g)]
    for g in groups:
        for t in g:
            if t.count("{}") != 1:
                raise ValueError(f"context template must contain '{{}}' exactly once: {t!r}")
            flat.append(t)
            w.append(1.0 / (len(groups) * len(g)))
    if "{}" not in flat:
        raise ValueError('context templates must include the bare template "{}"')
    return flat, np.asarray(w, np.float32)


def rewrite_rows(
    tokenizer: Any, req: Any, flat_templates: Sequence[str], *, chat: ChatFormat | None = None,
    max_positions: int | None = None,
) -> tuple[list[list[int]], list[int], list[int]]:
    """One request's rewriting rows (one per context template): token rows of prompt + target
    (``join_target`` / ``encode_pairs``), the target start and the subject's last-token index of
    each.  Raises ``RequestError`` naming the case and field (``prompt`` when a row is longer than
    ``max_positions``)."""
    cid = getattr(req, "case_id", None)
    prefixes, conts, lookups = [], [], []
    for tmpl in flat_templates:
        t = prompt_text(fill(tmpl, req.prompt), chat)  # the model's text, "{}" still in it
        lookups.append(subject_last_index(tokenizer, t, req.subject, case_id=cid))
        prefix, cont = join_target(fill(t, req.subject), req.target_new)
        prefixes.append(prefix)
        conts.append(cont)
    try:
        rows, starts = encode_pairs(tokenizer, prefixes, conts)
    except ValueError as e:
        raise RequestError(f"target_new {req.target_new!r}: {e}", case_id=cid, field="target_new") from e
    for j, (r, tmpl) in enumerate(zip(rows, flat_templates)):
        if lookups[j] >= starts[j]:
            raise RequestError(f"the subject's last token ({lookups[j]}) is not in the prompt's {starts[j]} tokens",
                               case_id=cid, field="subject")
        if max_positions is not None and len(r) > max_positions:
            raise RequestError(
                f"prompt with context template {tmpl!r} and target_new is {len(r)} tokens, longer than the "
                f"model's {max_positions} positions", case_id=cid, field="prompt")
    return rows, starts, lookups


def prepare_batch(
    tokenizer: Any,
    requests: Sequence[Any],
    templates: Sequence[Sequence[str]],
    *,
    n_pad: int | None = None,
    chat: ChatFormat | None = None,
    max_positions: int | None = None,
) -> tuple[EditBatch, int]:
    """Tokenize ``requests`` (EditRequest-like: case_id, subject, prompt, target_new).

    ``chat``: a ``tokens.ChatFormat`` to wrap the rewriting prompts in (None = plain text).
    ``max_positions``: refuse (``RequestError``, field ``prompt``) rows longer than the model's
    positions.  Every request is checked before anything is built (``requests.check_request``,
    ``check_conflicts``): a batch is refused whole, naming the case and field.
    Returns (batch, n) with n the number of real requests.
    """
    if not requests:
        raise ValueError("empty batch of requests")
    flat, w = template_weights(templates)
    G = len(flat)
    per = G + 1
    n = len(requests)
    n_pad = n_pad or bucket_requests(n)
    for req in requests:
        check_request(req)
    check_conflicts(requests)
    rows, lookups, tgts = [], [], []
    for req in requests:
        cid = getattr(req, "case_id", None)
        full, starts, idx = rewrite_rows(tokenizer, req, flat, chat=chat, max_positions=max_positions)
        for r, st, k in zip(full, starts, idx):
            rows.append(r[:-1])  # the last target token is predicted, never read
            lookups.append(k)
            tgts.append((st - 1, r[st:]))  # logits at st-1+j predict target token j
        lookups.append(subject_last_index(tokenizer, KL_TEMPLATE, req.subject, case_id=cid))
        rows.append(encode(tokenizer, fill(KL_TEMPLATE, req.subject)))
        tgts.append(None)
    R = n_pad * per
    tokens, mask, _ = pad_right(rows, pad_id(tokenizer), n_rows=len(rows))
    # pad requests: repeat the last request's rows
    reps = [i for i in range(len(rows))] + [len(rows) - per + (i % per) for i in range(R - len(rows))]
    tokens, mask = tokens[reps], mask[reps]
    lookups = [lookups[i] for i in reps]
    tgts = [tgts[i] for i in reps]
    Tt = bucket(max(len(t[1]) for t in tgts if t is not None), minimum=1)
    tgt_pos = np.zeros((R, Tt), np.int32)
    tgt_ids = np.zeros((R, Tt), np.int32)
    tgt_mask = np.zeros((R, Tt), bool)
    for r, t in enumerate(tgts):
        if t is None:
            continue
        start, ids = t
        k = len(ids)
        tgt_pos[r, :k] = np.arange(start, start + k)
        tgt_ids[r, :k] = ids
        tgt_mask[r, :k] = True
    key_avg = np.zeros((n_pad, R), np.float32)
    nll_avg = np.zeros((n_pad, R), np.float32)
    kl_sel = np.zeros((n_pad, R), np.float32)
    bare = flat.index("{}")
    for i in range(n_pad):
        key_avg[i, i * per: i * per + G] = w
        nll_avg[i, i * per: i * per + G] = 1.0 / G
        kl_sel[i, i * per + G] = 1.0
    batch = EditBatch(
        tokens=tokens, mask=mask, lookup=np.asarray(lookups, np.int32), tgt_pos=tgt_pos,
        tgt_ids=tgt_ids, tgt_mask=tgt_mask, key_avg=key_avg, nll_avg=nll_avg, kl_sel=kl_sel,
        bare_row=np.arange(n_pad, dtype=np.int32) * per + bare,
        valid=(np.arange(n_pad) < n).astype(np.float32),
    )
    return batch, n


def rows_per_request(batch: EditBatch) -> int:
    return batch.tokens.shape[0] // batch.valid.shape[0]


def select_rows(batch: EditBatch, keep: Sequence[int]) -> EditBatch:
    """Host-side sub-batch with only the rows ``keep`` (indices within each request's block).

    Used by the MetaKE look-ahead to score the virtual model on the bare prompt and the KL prompt
    only (``MetaKEConfig.prompts="bare"``).  NLL weights are renormalized over the kept rewriting
    rows; ``key_avg`` is restricted too (callers that need template-averaged keys use the full
    batch).  The bare-prompt row must be kept.
    """
    b = EditBatch(*[np.asarray(x) for x in batch])
    per = rows_per_request(b)
    n_pad = b.valid.shape[0]
    keep = sorted(set(int(k) for k in keep))
    bare = int(b.bare_row[0])
    if bare not in keep or any(not 0 <= k < per for k in keep):
        raise ValueError(f"select_rows: keep={keep} must lie in [0, {per}) and include the bare row {bare}")
    idx = np.asarray([i * per + k for i in range(n_pad) for k in keep], dtype=np.int32)
    T = bucket(int(b.mask[idx].sum(axis=1).max()), minimum=1, multiple=4)  # as Stage I's row groups
    b = b._replace(tokens=b.tokens[:, :T], mask=b.mask[:, :T])
    nll = b.nll_avg[:, idx]
    nll = nll / np.maximum(nll.sum(axis=1, keepdims=True), 1e-30)
    return EditBatch(
        tokens=b.tokens[idx], mask=b.mask[idx], lookup=b.lookup[idx], tgt_pos=b.tgt_pos[idx],
        tgt_ids=b.tgt_ids[idx], tgt_mask=b.tgt_mask[idx], key_avg=b.key_avg[:, idx], nll_avg=nll,
        kl_sel=b.kl_sel[:, idx], bare_row=np.arange(n_pad, dtype=np.int32) * len(keep) + keep.index(bare),
        valid=b.valid,
    )


def take_requests(batch: EditBatch, sel: Sequence[int], valid: Sequence[float]) -> EditBatch:
    """Host-side sub-batch of the requests ``sel`` (indices into ``batch``'s requests, in order),
    with ``valid`` (len(sel),) as the new validity (0 for padding copies).

    Every request keeps its rows, in order; the per-request weights (``key_avg``, ``nll_avg``,
    ``kl_sel``) move with their block, so each request's terms are those of the full batch.
    Used by Stage I to drop converged requests between steps (``StageIConfig.compact``).
    """
    b = EditBatch(*[np.asarray(x) for x in batch])
    per = rows_per_request(b)
    sel = np.asarray(sel, dtype=np.int64)
    rows = (sel[:, None] * per + np.arange(per)[None]).reshape(-1)
    T = int(b.mask[rows].sum(axis=1).max())
    T = min(b.tokens.shape[1], bucket(T))
    return EditBatch(
        tokens=b.tokens[rows, :T], mask=b.mask[rows, :T], lookup=b.lookup[rows], tgt_pos=b.tgt_pos[rows],
        tgt_ids=b.tgt_ids[rows], tgt_mask=b.tgt_mask[rows], key_avg=b.key_avg[sel][:, rows],
        nll_avg=b.nll_avg[sel][:, rows], kl_sel=b.kl_sel[sel][:, rows],
        bare_row=np.arange(len(sel), dtype=np.int32) * per + int(b.bare_row[0]),
        valid=np.asarray(valid, np.float32),
    )
