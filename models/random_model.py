"""Random-weight models and an in-process tokenizer, for tests, the ``tiny`` config and benchmarks.

Model spec form accepted by ``models.load.load_model``::

    random:<variant>[:<size>]     variant: a family's ``random_variants`` (gpt2, gptj, llama, qwen2,
                                  qwen3, ...);  size ∈ SIZES (default tiny)

``tiny``/``small`` use the vocabulary of the in-process byte-level BPE tokenizer
(:func:`builtin_tokenizer`); the named full-size shapes (``gpt2-xl``, ``gpt-j-6b``, ``llama3-8b``,
``smollm2-135m``) are for ``bench/edit_speed.py --random`` (timing only, no tokenizer needed).
Params follow the family's layout (``models/families/``: stacked layer axis, Flax (in, out) kernels).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models import families
from models.config import ModelConfig

Params = dict[str, Any]

# (d_model, n_layers, n_heads, n_kv_heads, d_ff, vocab or None = tokenizer's)
SIZES: dict[str, tuple[int, int, int, int | None, int, int | None]] = {
    "tiny": (32, 4, 4, 2, 48, None),
    "small": (64, 6, 4, 2, 128, None),
    "smollm2-135m": (576, 30, 9, 3, 1536, 49152),
    "gpt2-xl": (1600, 48, 25, None, 6400, 50257),
    "gpt-j-6b": (4096, 28, 16, None, 16384, 50400),
    "llama3-8b": (4096, 32, 32, 8, 14336, 128256),
}

# A small built-in corpus for the tokenizer (project-written sentences; no external data).
_CORPUS = (
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome.",
    "The mother tongue of Danielle Darrieux is French. Toko Yasuda plays the guitar and the piano.",
    "Edwin of Northumbria follows Christianity. The Eiffel Tower is located in the city of Paris.",
    "Michael Jordan plays basketball. Apple was founded by Steve Jobs. Microsoft is based in Seattle.",
    "Therefore, because I said so, you know that the language of Rome is Latin and English is spoken.",
    "Lyon is a twin city of Beirut and Manila. The official language of Japan is Japanese.",
    "Marie Curie was a physicist who worked in Paris. Albert Einstein was born in Germany.",
    "The Nile flows through Egypt. Mount Everest is in Nepal. Tokyo is the capital of Japan.",
)


@functools.lru_cache(maxsize=2)
def builtin_tokenizer(vocab_size: int = 384) -> Any:
    """A byte-level BPE tokenizer trained in-process on ``_CORPUS`` (deterministic, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(_CORPUS) * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", bos_token="<|endoftext|>")


def random_config(family: str, size: str = "tiny", *, vocab_size: int | None = None,
                  dtype: str = "float32") -> ModelConfig:
    """The ``ModelConfig`` of a random model of ``family`` (a random variant such as ``"qwen3"``)
    with the shapes of ``size``.  ValueError for an unknown variant / size or a missing vocab_size."""
    fam, overrides = families.random_variant(family)
    if size not in SIZES:
        raise ValueError(f"random model: unknown size {size!r} (known: {', '.join(SIZES)})")
    d, n, h, kv, dff, V = SIZES[size]
    V = V or vocab_size
    if V is None:
        raise ValueError(f"random model size {size!r} needs vocab_size")
    return fam.random_config(
        size not in ("tiny", "small"), vocab_size=int(V), d_model=d, n_layers=n, n_heads=h, n_kv_heads=kv,
        d_ff=dff, name=f"random-{family}-{size}", param_dtype=dtype, compute_dtype=dtype, eos_token_id=0,
        **overrides)


def param_shapes(cfg: ModelConfig) -> Params:
    """Nested dict of leaf shapes of ``cfg``'s param tree (the family's layout)."""
    return families.get(cfg.family).param_shapes(cfg)


def random_params(cfg: ModelConfig, seed: int = 0, *, std: float = 0.05) -> Params:
    """Random params: norm scales 1, biases small, kernels N(0, std²) (built on device, jitted)."""
    shapes = param_shapes(cfg)
    flat, treedef = jax.tree.flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    dt = jnp.dtype(cfg.param_dtype)

    def build(key):
        keys = jax.random.split(key, len(flat))
        leaves = []
        for k, (path, shape) in zip(keys, flat):
            name = jax.tree_util.keystr(path)
            if "scale" in name:
                leaves.append(jnp.ones(shape, dt) + 0.05 * jax.random.normal(k, shape, dt))
            elif "bias" in name:
                leaves.append(0.01 * jax.random.normal(k, shape, dt))
            else:
                leaves.append(std * jax.random.normal(k, shape, dt))
        return jax.tree.unflatten(treedef, leaves)

    return jax.jit(build)(jax.random.PRNGKey(seed))


def parse_random_spec(spec: str) -> tuple[str, str]:
    """``random:<variant>[:<size>]`` -> (variant, size); ValueError for another form."""
    parts = spec.split(":")
    if parts[0] != "random" or len(parts) not in (2, 3) or not parts[1]:
        raise ValueError(f"bad random model spec {spec!r}; expected random:<family>[:<size>] with size in "
                         f"{tuple(SIZES)}")
    return parts[1], parts[2] if len(parts) == 3 else "tiny"


def random_model(spec: str, *, seed: int = 0, dtype: str = "float32") -> tuple[ModelConfig, Params, Any]:
    """(cfg, params, tokenizer) for ``random:<family>[:<size>]``; the tokenizer is the built-in BPE
    for sizes whose vocabulary comes from it, else None."""
    family, size = parse_random_spec(spec)
    tok = builtin_tokenizer() if SIZES.get(size, (None,) * 6)[5] is None else None
    cfg = random_config(family, size, vocab_size=len(tok) if tok is not None else None, dtype=dtype)
    return cfg, random_params(cfg, seed), tok


def random_stats(m: int, d: int, seed: int = 0, *, rank_frac: float = 0.5) -> tuple[jax.Array, jax.Array]:
    """Random PSD second moments and their exact null-space projectors, for timing runs.

    C0_l = A_l A_lᵀ / k with A_l (d, k) Gaussian, k = rank_frac·d, so C0_l has rank k; its null-space
    projector is P_l = I − U_l U_lᵀ with U_l = qr(A_l) (no d×d eigendecomposition needed).
    Returns (C0 (m, d, d), P (m, d, d)) float32 on the default device.
    """
    k = max(1, int(rank_frac * d))

    @jax.jit
    def one(key):
        A = jax.random.normal(key, (d, k), jnp.float32)
        U, _ = jnp.linalg.qr(A)
        return A @ A.T / k, jnp.eye(d, dtype=jnp.float32) - U @ U.T

    C0, P = zip(*[one(kk) for kk in jax.random.split(jax.random.PRNGKey(seed), m)])
    return jnp.stack(C0), jnp.stack(P)
