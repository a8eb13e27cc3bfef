"""MEMIT- and ROME-style context templates (docs/FORMULAS.md §2, §R1): an editing convention, sampled
from the model with ``models.generate.sample_texts``."""
from __future__ import annotations

from typing import Any, Sequence

from models.config import ModelConfig
from models.generate import sample_texts

Params = dict[str, Any]

__all__ = ["SEED_WORDS", "context_templates", "template_from_text"]

SEED_WORDS: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")


def template_from_text(text: str) -> str:
    """A sampled prefix -> context template: braces become spaces, then ``". {}"`` (docs/FORMULAS.md §2)."""
    return text.replace("{", " ").replace("}", " ") + ". {}"


def context_templates(
    cfg: ModelConfig,
    params: Params,
    tokenizer: Any,
    *,
    seed: int = 0,
    n_per_prompt: int = 1,
    length: int = 10,
    lengths: Sequence[int] | None = None,
    seed_words: Sequence[str] = SEED_WORDS,
    skip_special_tokens: bool = True,
    top_k: int = 5,
) -> list[list[str]]:
    """The context templates ``[["{}"], [g_1 ... g_n], ...]``, one group per token length
    (docs/FORMULAS.md §2, §R1).

    Each g_j is a top-k (5) sample of ``length`` total tokens from a seed word, braces replaced by
    spaces and ``". {}"`` appended; ``n_per_prompt`` samples per seed word and length.
    ``lengths`` (e.g. ``(5, 10)``, ROME's ``context_template_length_params [[5, 10], [10, 10]]`` with
    ``n_per_prompt=2``: "{}" + 10 of 5 tokens + 10 of 10 tokens, kmeng01/rome ``rome_main.py``) gives
    one group per length and replaces ``length``.  Seeded and reproducible (the reference is unseeded):
    group j samples with ``seed + GROUP_SEED_STRIDE·j``, so a single length gives what it always gave.
    ``skip_special_tokens=False`` reproduces the AE Llama-3 quirk (a literal BOS text prefix).
    Raises ValueError for a length or ``n_per_prompt`` below 1.
    """
    lens = tuple(int(x) for x in (lengths if lengths else (length,)))
    if n_per_prompt < 1 or min(lens) < 1:
        raise ValueError(f"context_templates: n_per_prompt and every length must be >= 1, got "
                         f"n_per_prompt={n_per_prompt}, lengths={lens}")
    prompts = [w for w in seed_words for _ in range(n_per_prompt)]
    out = [["{}"]]
    for j, n_tok in enumerate(lens):
        texts = sample_texts(
            cfg, params, tokenizer, prompts, max_out_len=n_tok, top_k=top_k, seed=seed + GROUP_SEED_STRIDE * j,
            skip_special_tokens=skip_special_tokens,
        )
        out.append([template_from_text(t) for t in texts])
    return out


#: seed offset between template groups of different lengths (distinct samples per group)
GROUP_SEED_STRIDE = 104729
