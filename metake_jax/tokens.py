"""Tokenization helpers the editor needs (METHOD.md §2).

* ``subject_last_index``: the subject's last-token index, reference rule
  ``len(tokenize(prefix + subject)) - 1`` with BOS included where the tokenizer adds one.
* ``encode`` / ``target_ids``: token ids with the tokenizer's own special-token convention;
  target ids never carry a BOS.
* ``pad_right``: right-padded int32 batches with masks and true lengths, padded to static
  buckets so jitted functions see few distinct shapes.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from metake_jax.errors import RequestError

Tokenizer = Any


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` as the tokenizer encodes a model input (BOS where it adds one)."""
    return list(tokenizer(text)["input_ids"])


def bos_id(tokenizer: Tokenizer) -> int | None:
    """The BOS id if the tokenizer prepends one to every input, else None."""
    ids = encode(tokenizer, "a")
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None and ids and ids[0] == bos else None


def target_ids(tokenizer: Tokenizer, target: str, *, case_id: Any = None) -> list[int]:
    """Ids of a continuation ``target`` (caller supplies the leading space); BOS stripped."""
    ids = encode(tokenizer, target)
    b = bos_id(tokenizer)
    if b is not None and ids and ids[0] == b:
        ids = ids[1:]
    if not ids:
        raise RequestError(f"target {target!r} tokenizes to no tokens", case_id=case_id, field="target_new")
    return ids


def fill(template: str, value: str) -> str:
    """Replace the single ``{}`` of ``template`` (no str.format: other braces are left alone)."""
    return template.replace("{}", value, 1)


def subject_last_index(
    tokenizer: Tokenizer, template: str, subject: str, *, case_id: Any = None
) -> int:
    """Index of the subject's last token in ``fill(template, subject)`` (METHOD.md §2 rule)."""
    if template.count("{}") != 1:
        raise RequestError(f"template must contain '{{}}' exactly once: {template!r}", case_id=case_id, field="prompt")
    prefix = template[: template.index("{}")]
    n = len(encode(tokenizer, prefix + subject))
    if n == 0:
        raise RequestError(f"subject {subject!r} tokenizes to no tokens", case_id=case_id, field="subject")
    full = encode(tokenizer, fill(template, subject))
    if n > len(full):
        raise RequestError(f"subject {subject!r} not found in tokenized prompt", case_id=case_id, field="subject")
    return n - 1


def bucket(n: int, *, minimum: int = 8, multiple: int = 8) -> int:
    """Static size bucket: powers of two below ``multiple``, then multiples of ``multiple``.

    Coarse enough that a sequential stream reuses a few compiled shapes, fine enough that
    padding wastes little compute (rows of 19 tokens pad to 24, not 32).
    """
    n = max(n, minimum)
    if n <= multiple:
        return 1 << (n - 1).bit_length()
    return ((n + multiple - 1) // multiple) * multiple


def bucket_requests(n: int) -> int:
    """Static bucket for the number of requests in a batch: 1, 2, 4, then multiples of 8."""
    if n <= 4:
        return 1 << max(n - 1, 0).bit_length()
    return ((n + 7) // 8) * 8


def pad_right(
    rows: Sequence[Sequence[int]], pad_id: int, *, length: int | None = None, n_rows: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-pad ``rows`` to (n_rows, length). Returns tokens int32, mask bool, true lengths.

    Extra rows (beyond ``len(rows)``) are copies of the last row so every row is a valid input;
    callers drop them by index.
    """
    lengths = np.array([len(r) for r in rows], dtype=np.int32)
    if (lengths == 0).any():
        raise ValueError(f"empty token row at index {int(np.argmin(lengths))}")
    T = length or bucket(int(lengths.max()))
    B = n_rows or len(rows)
    if T < lengths.max() or B < len(rows):
        raise ValueError(f"pad_right: rows ({len(rows)}, {lengths.max()}) exceed ({B}, {T})")
    tokens = np.full((B, T), pad_id, dtype=np.int32)
    mask = np.zeros((B, T), dtype=bool)
    full_lengths = np.zeros((B,), dtype=np.int32)
    for i in range(B):
        r = rows[min(i, len(rows) - 1)]
        tokens[i, : len(r)] = r
        mask[i, : len(r)] = True
        full_lengths[i] = len(r)
    return tokens, mask, full_lengths


def pad_id(tokenizer: Tokenizer) -> int:
    pid = getattr(tokenizer, "pad_token_id", None)
    if pid is None:
        pid = getattr(tokenizer, "eos_token_id", None)
    return int(pid or 0)
