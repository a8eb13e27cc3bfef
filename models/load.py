"""One entry point for every kind of model spec: ``load_model(spec) -> (config, params, tokenizer)``.

Specs, tried in this order:

* ``smollm2`` / ``embedded``: the embedded SmolLM2-135M-Instruct (``models.embedded``);
* ``random:<variant>[:<size>]``: random weights (``models.random_model``; built-in tokenizer for
  the test sizes, None for the full-size shapes);
* a path to a ``.gguf`` file (``models.convert.load_gguf``);
* a converted directory written by ``models.convert.save_converted`` (orbax + JSON config);
* an HF checkpoint directory (``config.json`` + weights);
* a hub id ``org/name`` (downloaded with ``huggingface_hub``; never while ``HF_HUB_OFFLINE=1``).

This module sits above ``models.convert`` and ``models.embedded`` (which uses the converter), so
neither of them imports the other's caller.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from models.config import ModelConfig
from models.convert import (
    CONVERTED_MARKER, PLACE, cast, converted_tokenizer, is_converted_dir, load_gguf, load_hf_checkpoint, load_tokenizer,
    np_dtype, resolve_hf_dir, restore_converted,
)
from models.errors import ConversionError

Params = dict[str, Any]

__all__ = ["EMBEDDED_NAMES", "RANDOM_PREFIX", "load_model"]

EMBEDDED_NAMES = ("smollm2", "embedded")
RANDOM_PREFIX = "random:"


def _try_tokenizer(path: Path) -> Any:
    """The tokenizer of a checkpoint dir / GGUF file, or None when it has none."""
    try:
        return load_tokenizer(path)
    except ConversionError:
        return None


def load_model(spec: str, *, dtype: str | None = None, seed: int = 0,
               place: Callable[[tuple[str, ...], Any], Any] | None = None) -> tuple[ModelConfig, Params, Any]:
    """(config, params, tokenizer or None) of a model spec (see the module docstring).

    dtype: ``"float32"`` | ``"bfloat16"`` | None (keep the stored dtype; float32 for HF / GGUF
    sources and random models).  seed: the weights of a ``random:`` spec.  ``place(path, host
    array) -> jax.Array``: how each leaf read from a file reaches the devices (e.g. sharded, so that
    no device ever holds the whole tree; ``models.convert.PLACE``); random models are built on the
    default device.
    Raises ConversionError naming the spec, file or tensor at fault (a bad ``random:`` spec too).
    """
    token = PLACE.set(place)
    try:
        return _load(str(spec), dtype, seed)
    finally:
        PLACE.reset(token)


def _load(spec: str, dtype: str | None, seed: int) -> tuple[ModelConfig, Params, Any]:
    if spec.lower() in EMBEDDED_NAMES:
        from models.embedded import load_smollm2

        cfg, params, tok = load_smollm2()
        return (*cast(cfg, params, dtype), tok)
    if spec.startswith(RANDOM_PREFIX):
        from models.random_model import random_model

        try:
            return random_model(spec, seed=seed, dtype=dtype or "float32")
        except ValueError as e:
            raise ConversionError(str(e)) from e
    p = Path(spec).expanduser()
    if dtype is not None:
        np_dtype(dtype)  # ConversionError for a bad dtype before reading anything
    if p.suffix == ".gguf":
        cfg, params = load_gguf(p, dtype=dtype or "float32")
        return cfg, params, _try_tokenizer(p)
    if p.is_dir():
        if is_converted_dir(p):
            cfg, params = restore_converted(p)
            return (*cast(cfg, params, dtype), converted_tokenizer(p))
        if (p / "config.json").is_file():
            cfg, params = load_hf_checkpoint(str(p), dtype=dtype or "float32")
            return cfg, params, _try_tokenizer(p)
        raise ConversionError(
            f"{p}: directory is neither an HF checkpoint (config.json) nor a converted model ({CONVERTED_MARKER})"
        )
    if p.exists():
        raise ConversionError(f"{spec}: not a .gguf file or a model directory")
    parts = spec.split("/")
    if len(parts) == 2 and all(parts) and not spec.startswith((".", "~")):
        cfg, params = load_hf_checkpoint(spec, dtype=dtype or "float32")
        return cfg, params, _try_tokenizer(resolve_hf_dir(spec))
    raise ConversionError(
        f"unknown model {spec!r}; accepted: {' / '.join(EMBEDDED_NAMES)} (the embedded SmolLM2-135M), "
        f"{RANDOM_PREFIX}<family>[:<size>] (random weights), a path to a .gguf file, a converted model "
        "directory (from save_converted), an HF checkpoint directory (config.json + weights), "
        "or a hub id 'org/name' (online only)"
    )
