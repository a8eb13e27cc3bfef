"""Tokenized, padded inputs for one edit batch (METHOD.md §2–§3).

Every request contributes one row per context template (its rewriting prompts: template-filled
prompt followed by the target tokens except the last) and one KL row (``"{subject} is a"``).
The same rows give the keys (§2: read at the subject's last token, which causal attention makes
independent of the appended target tokens), the Stage I loss (§3) and the MetaKE edit/locality
losses (§6).  Requests are padded to a static bucket; padded requests are copies of the last one
and are masked out by ``valid`` (their key and residual columns are zeroed before any solve).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

from metake_jax.errors import RequestError
from metake_jax.tokens import (
    bucket, bucket_requests, encode, fill, pad_id, pad_right, subject_last_index, target_ids,
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


def _target_text(t: str) -> str:
    return t if t[:1].isspace() else " " + t


def template_weights(templates: Sequence[Sequence[str]]) -> tuple[list[str], np.ndarray]:
    """Flatten template groups; weight = 1/n_groups · 1/len(group) (METHOD.md §2)."""
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


def prepare_batch(
    tokenizer: Any,
    requests: Sequence[Any],
    templates: Sequence[Sequence[str]],
    *,
    n_pad: int | None = None,
) -> tuple[EditBatch, int]:
    """Tokenize ``requests`` (EditRequest-like: case_id, subject, prompt, target_new).

    Returns (batch, n) with n the number of real requests.
    """
    if not requests:
        raise ValueError("empty batch of requests")
    flat, w = template_weights(templates)
    G = len(flat)
    per = G + 1
    n = len(requests)
    n_pad = n_pad or bucket_requests(n)
    rows, lookups, tgts = [], [], []
    for req in requests:
        cid = getattr(req, "case_id", None)
        subject, prompt = req.subject, req.prompt
        if not isinstance(subject, str) or not subject.strip():
            raise RequestError("subject is empty", case_id=cid, field="subject")
        if not isinstance(prompt, str) or prompt.count("{}") != 1:
            raise RequestError("prompt must contain '{}' exactly once", case_id=cid, field="prompt")
        if not isinstance(req.target_new, str) or not req.target_new.strip():
            raise RequestError("target_new is empty", case_id=cid, field="target_new")
        t_ids = target_ids(tokenizer, _target_text(req.target_new), case_id=cid)
        for tmpl in flat:
            ctx = fill(tmpl, prompt)
            idx = subject_last_index(tokenizer, ctx, subject, case_id=cid)
            ids = encode(tokenizer, fill(ctx, subject)) + t_ids[:-1]
            rows.append(ids)
            lookups.append(idx)
            tgts.append((len(ids) - len(t_ids), t_ids))
        idx = subject_last_index(tokenizer, KL_TEMPLATE, subject, case_id=cid)
        rows.append(encode(tokenizer, fill(KL_TEMPLATE, subject)))
        lookups.append(idx)
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
        tgt_pos[r, :k] = np.arange(start, start + k)  # logits at start+j predict target token j
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
    T = bucket(int(b.mask[idx].sum(axis=1).max()))
    b = b._replace(tokens=b.tokens[:, :T], mask=b.mask[:, :T])
    nll = b.nll_avg[:, idx]
    nll = nll / np.maximum(nll.sum(axis=1, keepdims=True), 1e-30)
    return EditBatch(
        tokens=b.tokens[idx], mask=b.mask[idx], lookup=b.lookup[idx], tgt_pos=b.tgt_pos[idx],
        tgt_ids=b.tgt_ids[idx], tgt_mask=b.tgt_mask[idx], key_avg=b.key_avg[:, idx], nll_avg=nll,
        kl_sel=b.kl_sel[:, idx], bare_row=np.arange(n_pad, dtype=np.int32) * len(keep) + keep.index(bare),
        valid=b.valid,
    )
