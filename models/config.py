"""Model configuration shared by every family.

One frozen, hashable dataclass describes every registered family (``models/families/``, e.g. GPT-2,
GPT-J, the Llama family with Llama 3 / SmolLM2 / Qwen2 (q/k/v bias) / Qwen3 (q/k RMS-norm)).
It is passed as a *static* argument to jitted functions.  ``family`` names the family object that
knows the param layout, HF names and block options (``models.families.get(cfg.family)``; the
layout itself is documented in ``models/families/base.py``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters (static under jit)."""

    family: str  # a registered family name (models/families/__init__.py)
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int  # d_k of docs/FORMULAS.md §1: the key width
    n_kv_heads: int | None = None
    head_dim: int | None = None
    max_positions: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rotary_dim: int | None = None  # rotary on the first rotary_dim dims of a head (None: all)
    tie_embeddings: bool = False
    lm_head_bias: bool = False
    attn_bias: bool = False  # q/k/v biases where the family makes them optional (qwen2)
    qk_norm: bool = False  # RMS-norm of q and k per head (qwen3)
    activation: str = "gelu_new"  # informational; the block uses its family's BlockOptions.activation
    name: str = "model"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    # Rematerialize each block of a layer scan in backward passes (jax.checkpoint): the memory of
    # Stage I / look-ahead / exact hypergradient drops from ~5 B×T×d_ff floats per layer to one
    # B×T×d hidden state, for ~1/3 more compute.  Needed for 6-8B models at batch 100 (GPT-J:
    # 127 GiB without it on an H200, bench/RESULTS.md); off for SmolLM2 on CPU.
    remat: bool = False

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def d_key(self) -> int:
        return self.d_ff

    @property
    def dtype(self) -> Any:
        return jnp.dtype(self.compute_dtype)

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
