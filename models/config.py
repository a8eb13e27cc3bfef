"""Model configuration shared by every family, and the param-tree layout.

One frozen, hashable dataclass describes GPT-2, GPT-J and the Llama family (Llama 3, SmolLM2,
Qwen2 with q/k/v bias, Qwen3 with q/k RMS-norm).  It is passed as a *static* argument to jitted
functions.

Param tree (plain nested dicts of arrays; per-layer weights stacked on a leading layer axis ``N``;
every dense kernel in the Flax ``(in, out)`` layout)::

    embed/wte                (V, d)
    embed/wpe                (P, d)                     gpt2 only
    layers/ln_1/{scale,bias} (N, d)                     bias: layernorm families only
    layers/ln_2/{scale,bias} (N, d)                     absent for gptj (parallel block)
    layers/attn/{q,k,v}/kernel  (N, d, H*hd) / (N, d, Hkv*hd)
    layers/attn/{q,k,v}/bias    (N, H*hd) ...           gpt2, qwen2 (attn_bias=True)
    layers/attn/o/kernel        (N, H*hd, d)
    layers/attn/o/bias          (N, d)                  gpt2 only
    layers/attn/{q_norm,k_norm}/scale (N, hd)           qwen3 (qk_norm=True)
    layers/mlp/fc_in/{kernel,bias}  (N, d, d_k), (N, d_k)   gpt2 / gptj
    layers/mlp/gate/kernel, layers/mlp/up/kernel (N, d, d_k)  llama family
    layers/mlp/fc_out/kernel  (N, d_k, d)   <- W_out^T of METHOD.md §1 (the edited weight)
    layers/mlp/fc_out/bias    (N, d)        gpt2 / gptj
    ln_f/{scale,bias}        (d,)
    lm_head/kernel           (d, V)                     absent when tie_embeddings
    lm_head/bias             (V,)                       gptj only
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax.numpy as jnp

Family = Literal["gpt2", "gptj", "llama"]

FAMILIES: tuple[str, ...] = ("gpt2", "gptj", "llama")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters (static under jit)."""

    family: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int  # d_k of METHOD.md §1: the key width
    n_kv_heads: int | None = None
    head_dim: int | None = None
    max_positions: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rotary_dim: int | None = None  # gptj: partial rotary (interleaved); llama: full (half-split)
    tie_embeddings: bool = False
    lm_head_bias: bool = False
    attn_bias: bool = False  # qwen2 q/k/v bias
    qk_norm: bool = False  # qwen3
    activation: str = "gelu_new"  # "gelu_new" (gpt2/gptj) or "silu" (llama, gated)
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

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(
                f"unknown model family {self.family!r}; known families: {', '.join(FAMILIES)}"
            )

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
