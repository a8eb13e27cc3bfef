"""Tokenization helpers the editor and the scorers share (docs/FORMULAS.md §2, §8).

* ``encode_pairs``: THE token rows of (prefix, continuation) pairs — Stage I rows, the keys'
  prompts and every benchmark score are built with it, so an edit is trained on exactly the tokens
  it is measured on.  The texts come from ``metake_jax.requests.join_target`` (one join rule).
* ``subject_last_index``: the subject's last-token index, read from the fast tokenizer's offset
  mapping: the token whose character span contains the subject's last character (for every
  tokenizer; ties — a character split over several byte tokens — take the last of them).
  Tokenizers without offsets fall back to the reference rule ``len(tokenize(prefix + subject)) − 1``.
* ``chat_format``: the tokenizer's chat template as a (head, tail) pair around one user message.
* ``encode`` / ``bos_id`` / ``pad_id``: the tokenizer's own special-token convention.
* ``pad_right``: right-padded int32 batches with masks and true lengths, padded to static
  buckets so jitted functions see few distinct shapes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from metake_jax.errors import RequestError

Tokenizer = Any

__all__ = [
    "ChatFormat", "PairError", "bos_id", "bucket", "bucket_requests", "chat_format", "encode", "encode_pairs", "fill",
    "pad_id", "pad_right", "subject_last_index",
]


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` as the tokenizer encodes a model input (BOS where it adds one)."""
    return list(tokenizer(text)["input_ids"])


def bos_id(tokenizer: Tokenizer) -> int | None:
    """The BOS id if the tokenizer prepends one to every input, else None."""
    ids = encode(tokenizer, "a")
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None and ids and ids[0] == bos else None


def fill(template: str, value: str) -> str:
    """Replace the single ``{}`` of ``template`` (no str.format: other braces are left alone)."""
    return template.replace("{}", value, 1)


# ----------------------------------------------------------------------------- (prefix, continuation) rows


class PairError(ValueError):
    """A (prefix, continuation) pair that cannot be scored; ``index`` is its position in the input."""

    def __init__(self, index: int, message: str) -> None:
        self.index = index
        super().__init__(f"pair {index}: {message}")
        self.reason = message


def _encode_many(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    try:
        out = tokenizer(list(texts))["input_ids"]
        if len(out) == len(texts) and all(isinstance(r, (list, tuple, np.ndarray)) for r in out):
            return [list(map(int, r)) for r in out]
    except (TypeError, ValueError, AttributeError):
        pass
    return [list(map(int, tokenizer(t)["input_ids"])) for t in texts]


def encode_pairs(
    tokenizer: Tokenizer, prefixes: Sequence[str], targets: Sequence[str]
) -> tuple[list[list[int]], list[int]]:
    """Token rows for ``prefix + target`` and each row's target start.

    ``ids = tokenize(prefix + target)`` and ``P = len(tokenize(prefix))``; the target tokens are
    ``ids[P:]``.  A tokenizer that prepends BOS does so once, at the start of both, so ``P`` counts
    it and the target never includes it.  If BPE merges across the boundary so that ``ids[:P]``
    differs from the prefix's own ids, the row becomes ``prefix ids + target ids`` (the target
    tokenized alone, BOS stripped): the prefix is always tokenized as the model reads it without
    the target.  ``target`` carries its own separator (``requests.join_target``); nothing is added.

    Returns (rows: list of n int lists, starts: n ints).  Raises ``PairError`` (a ValueError with
    the pair's ``index``) when a target adds no token or the prefix is empty for a tokenizer
    without BOS.
    """
    if len(prefixes) != len(targets):
        raise ValueError(f"{len(prefixes)} prefixes but {len(targets)} targets")
    for i, (p, t) in enumerate(zip(prefixes, targets)):
        if not isinstance(p, str) or not isinstance(t, str):
            raise TypeError(f"pair {i}: prefix and target must be strings, got {type(p).__name__}, {type(t).__name__}")
    full = _encode_many(tokenizer, [p + t for p, t in zip(prefixes, targets)])
    pre = _encode_many(tokenizer, list(prefixes))
    special = _encode_many(tokenizer, [""])[0]  # e.g. [bos] for tokenizers that prepend one
    rows, starts = [], []
    fix = [i for i in range(len(full)) if full[i][: len(pre[i])] != pre[i]]
    alone = dict(zip(fix, _encode_many(tokenizer, [targets[i] for i in fix])))
    for i, (f, p) in enumerate(zip(full, pre)):
        if i in alone:
            t = alone[i][len(special):] if alone[i][: len(special)] == special else alone[i]
            f = p + t
        if len(f) <= len(p):
            raise PairError(i, f"target {targets[i]!r} adds no tokens after prefix {prefixes[i]!r}")
        if len(p) == 0:
            raise PairError(i, f"empty prefix with a tokenizer that adds no BOS; nothing predicts the first "
                               f"target token of {targets[i]!r}")
        rows.append(f)
        starts.append(len(p))
    return rows, starts


# ----------------------------------------------------------------------------- the subject's last token


def _offsets(tokenizer: Tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]] | None:
    """(ids, character spans) from a fast tokenizer's offset mapping, or None without one."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    enc = tokenizer(text, return_offsets_mapping=True)
    return list(enc["input_ids"]), [(int(s), int(e)) for s, e in enc["offset_mapping"]]


def subject_last_index(
    tokenizer: Tokenizer, template: str, subject: str, *, case_id: Any = None, field: str = "subject"
) -> int:
    """Index of the subject's last token in ``tokenize(fill(template, subject))`` (docs/FORMULAS.md §2).

    The token is the one whose character span contains the subject's last character (the last
    such token when a character is split over several byte tokens).  Raises ``RequestError``
    naming ``case_id`` and ``field`` when the template has no single ``{}``, the subject is blank
    or ends in whitespace, or no token covers its last character.
    """
    if template.count("{}") != 1:
        raise RequestError(f"template must contain '{{}}' exactly once: {template!r}", case_id=case_id, field="prompt")
    if not subject or subject != subject.strip():
        raise RequestError(f"subject {subject!r} is empty or has leading/trailing whitespace (strip it: the key "
                           "is read at the subject's last character)", case_id=case_id, field=field)
    start = template.index("{}")
    end = start + len(subject)  # the subject occupies text[start:end]
    text = fill(template, subject)
    got = _offsets(tokenizer, text)
    if got is not None:
        ids, spans = got
        cover = [i for i, (s, e) in enumerate(spans) if s <= end - 1 < e]
        if not cover:
            raise RequestError(f"no token of {text!r} covers the subject's last character {subject[-1]!r} "
                               f"(position {end - 1})", case_id=case_id, field=field)
        return cover[-1]
    # no offset mapping: the reference rule, checked against the whole text's tokens
    n = len(encode(tokenizer, text[:end]))
    before = len(encode(tokenizer, text[:start].rstrip()))  # "of " ends in a space token that " France" absorbs
    full = encode(tokenizer, text)
    if n <= before or n > len(full):
        raise RequestError(f"subject {subject!r} adds no tokens after the prompt prefix {text[:start]!r}",
                           case_id=case_id, field=field)
    return n - 1


# ----------------------------------------------------------------------------- chat template


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """One user message in the tokenizer's chat template, generation prompt included:
    ``wrap(text) = head + text + tail`` (e.g. ``"…<|im_start|>user\\n" + text + "<|im_end|>\\n<|im_start|>assistant\\n"``)."""

    head: str
    tail: str

    def wrap(self, text: str) -> str:
        return self.head + text + self.tail


def chat_format(tokenizer: Tokenizer) -> ChatFormat:
    """The tokenizer's chat template around one user message (``apply_chat_template(...,
    add_generation_prompt=True)``), split into (head, tail).

    A BOS the template writes as text is dropped from ``head`` when the tokenizer adds it anyway
    (no doubled BOS).  Raises ValueError when there is no chat template, or it does not insert the
    message verbatim, or head/tail contain ``{}``.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) has no chat template")

    def render(content: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)

    mark = "\ue000"  # a private-use character: never in a chat template
    parts = render(mark).split(mark)
    probe = "The probe text, with {} and ünïcode."
    if len(parts) != 2 or render(probe) != parts[0] + probe + parts[1]:
        raise ValueError("the tokenizer's chat template does not insert the user message verbatim")
    head, tail = parts
    if "{}" in head + tail:
        raise ValueError("the tokenizer's chat template contains '{}' outside the message")
    bos_text = getattr(tokenizer, "bos_token", None)
    if bos_id(tokenizer) is not None and bos_text and head.startswith(bos_text):
        head = head[len(bos_text):]
    return ChatFormat(head=head, tail=tail)


# ----------------------------------------------------------------------------- padding


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
