"""MEMIT-style context templates (docs/FORMULAS.md §2, §R1): an editing convention, sampled
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
    seed_words: Sequence[str] = SEED_WORDS,
    skip_special_tokens: bool = True,
    top_k: int = 5,
) -> list[list[str]]:
    """The MEMIT context templates ``[["{}"], [g_1 ... g_n]]`` (docs/FORMULAS.md §2, §R1).

    Each g_j is a top-k (5) sample of ``length`` total tokens from a seed word, braces replaced by
    spaces and ``". {}"`` appended.  Seeded and reproducible (the reference is unseeded).
    ``skip_special_tokens=False`` reproduces the AE Llama-3 quirk (a literal BOS text prefix).
    """
    prompts = [w for w in seed_words for _ in range(n_per_prompt)]
    texts = sample_texts(
        cfg, params, tokenizer, prompts, max_out_len=length, top_k=top_k, seed=seed,
        skip_special_tokens=skip_special_tokens,
    )
    return [["{}"], [template_from_text(t) for t in texts]]
