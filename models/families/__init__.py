"""The registry of model families: one module per family, one line per module below.

``get(cfg.family)`` returns the family object (``models/families/base.py``) that the generic code
asks for block options, HF names, param shapes and configs; nothing outside ``models/families/``
branches on family names.  To add a family: write ``models/families/<name>.py`` (a ``Family``
subclass and ``FAMILY = ...``) and add its module to ``FAMILY_MODULES``.
"""
from __future__ import annotations

import functools
import importlib
from typing import Any, Mapping

from models.config import ModelConfig
from models.errors import ConversionError
from models.families.base import BlockOptions, Family, model_type

FAMILY_MODULES: tuple[str, ...] = (
    "models.families.gpt2",
    "models.families.gptj",
    "models.families.llama",
    "models.families.phi",
)

__all__ = ["BlockOptions", "Family", "block_options", "for_model_type", "get", "names", "random_variant"]


@functools.cache
def _registry() -> dict[str, Family]:
    fams = [importlib.import_module(m).FAMILY for m in FAMILY_MODULES]
    return {f.name: f for f in fams}


def names() -> tuple[str, ...]:
    """The registered family names (``ModelConfig.family`` values)."""
    return tuple(_registry())


def get(family: str) -> Family:
    """The family object named ``family``; ValueError naming the known families otherwise."""
    reg = _registry()
    if family not in reg:
        raise ValueError(f"unknown model family {family!r}; known families: {', '.join(reg)}")
    return reg[family]


def for_model_type(hf: Mapping[str, Any]) -> Family:
    """The family reading an HF ``config.json`` dict (by ``model_type``); ConversionError otherwise."""
    mt = model_type(hf)
    for fam in _registry().values():
        if mt in fam.model_types:
            return fam
    known = sorted(t for f in _registry().values() for t in f.model_types)
    raise ConversionError(
        f"unknown architecture model_type={mt!r} (architectures={hf.get('architectures')}); "
        f"supported: {', '.join(known)}"
    )


def random_variant(variant: str) -> tuple[Family, Mapping[str, Any]]:
    """``random:<variant>`` → (family, ModelConfig overrides); ValueError listing the variants."""
    table = {v: (f, o) for f in _registry().values() for v, o in (f.random_variants or {f.name: {}}).items()}
    if variant not in table:
        raise ValueError(f"random model: unknown family {variant!r} (known: {', '.join(table)})")
    return table[variant]


@functools.lru_cache(maxsize=None)
def block_options(cfg: ModelConfig) -> BlockOptions:
    """The block options of ``cfg`` (cached per config; called at trace time under jit)."""
    return get(cfg.family).block(cfg)
