"""Generation-text metrics: n-gram entropy (Fluency) and TF-IDF cosine (Consistency), docs/FORMULAS.md §8.

Word tokenizer: the reference uses ``nltk.word_tokenize``; nltk is not available here, so words
are split with the regex ``WORD_RE`` — runs of word characters (keeping internal apostrophes /
hyphens, e.g. "don't", "well-known") and each other non-space character as its own token
(punctuation).  This matches nltk on ordinary prose except for contractions (nltk splits "don't"
into "do" "n't") and a few quote/period conventions; entropies can differ slightly from the
reference on such texts.

TF-IDF follows sklearn's ``TfidfVectorizer(vocabulary=V)`` with ``idf_ = idf`` as the reference
uses it (docs/FORMULAS.md §R7): lowercase, token pattern ``(?u)\\b\\w\\w+\\b``, raw term counts times
idf, then the cosine of the two vectors (the l2 normalisation cancels in the cosine).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

__all__ = [
    "TfidfModel", "WORD_RE", "load_attribute_snippets", "ngram_entropy", "text_ngram_entropy", "word_tokenize",
]

WORD_RE = re.compile(r"\w+(?:['\-]\w+)*|[^\w\s]", re.UNICODE)
_SK_TOKEN_RE = re.compile(r"(?u)\b\w\w+\b")


def word_tokenize(text: str) -> list[str]:
    """Regex word tokenizer (stand-in for nltk.word_tokenize; see module docstring)."""
    return WORD_RE.findall(text)


def _entropy_bits(counts: Sequence[int]) -> float:
    c = np.asarray(counts, dtype=np.float64)
    if c.size == 0:
        return 0.0
    p = c / c.sum()
    return float(-(p * np.log2(p)).sum())


def text_ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """One text's score: mean_n(w_n · H_n), H_n the entropy in bits of the n-gram frequencies.

    With the defaults this is (2/3·H2 + 4/3·H3)/2 = H2/3 + 2·H3/3 (docs/FORMULAS.md §R7).  A text with
    fewer than n words has H_n = 0 (the reference's empty frequency table gives 0 too).
    """
    toks = word_tokenize(text)
    hs = []
    for n in ns:
        grams = Counter(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))
        hs.append(_entropy_bits(list(grams.values())))
    return float(np.mean(np.asarray(hs) * np.asarray(weights, dtype=np.float64)))


def ngram_entropy(texts: Sequence[str]) -> float:
    """Arithmetic mean of ``text_ngram_entropy`` over texts (one record's Fluency, before ×100)."""
    if not texts:
        raise ValueError("ngram_entropy needs at least one text")
    return float(np.mean([text_ngram_entropy(t) for t in texts]))


class TfidfModel:
    """TF-IDF vectors with a fixed vocabulary and idf (the reference's fitted vectorizer)."""

    def __init__(self, vocab: Mapping[str, int], idf: np.ndarray) -> None:
        idf = np.asarray(idf, dtype=np.float64).reshape(-1)
        if len(vocab) != idf.shape[0]:
            raise ValueError(f"vocabulary has {len(vocab)} entries but idf has {idf.shape[0]}")
        bad = [w for w, i in vocab.items() if not 0 <= int(i) < idf.shape[0]]
        if bad:
            raise ValueError(f"vocabulary indices out of range for {bad[:3]}")
        self.vocab = {str(w): int(i) for w, i in vocab.items()}
        self.idf = idf

    @classmethod
    def from_files(cls, idf_path: str | Path, vocab_path: str | Path) -> "TfidfModel":
        return cls(json.loads(Path(vocab_path).read_text(encoding="utf-8")), np.load(idf_path))

    def vector(self, text: str) -> np.ndarray:
        v = np.zeros(self.idf.shape[0])
        for tok in _SK_TOKEN_RE.findall(text.lower()):
            j = self.vocab.get(tok)
            if j is not None:
                v[j] += 1.0
        return v * self.idf

    def similarity(self, text_a: str, text_b: str) -> float:
        """Cosine of the two TF-IDF vectors (0 when either has no vocabulary words; sklearn+numpy would give nan)."""
        a, b = self.vector(text_a), self.vector(text_b)
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        if na == 0.0 or nb == 0.0:
            return 0.0
        return float(a @ b / (na * nb))


def load_attribute_snippets(path: str | Path) -> dict[str, dict[str, list[str]]]:
    """``attribute_snippets.json`` -> {relation_id: {target_id: [snippet texts]}}."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of {{relation_id, target_id, samples}} records")
    out: dict[str, dict[str, list[str]]] = {}
    for i, rec in enumerate(data):
        try:
            rid, tid = rec["relation_id"], rec["target_id"]
            texts = [s["text"] for s in rec["samples"]]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: record {i} lacks relation_id/target_id/samples[].text ({e})") from e
        out.setdefault(rid, {}).setdefault(tid, []).extend(texts)
    return out
