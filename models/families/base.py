"""What a model family is: the one object that knows a family's names, shapes and block options.

A family module (``models/families/<name>.py``) defines one subclass of :class:`Family` and one
instance ``FAMILY``; the registry (``models/families/__init__.py``) lists the modules.  Everything
else asks the family object of ``cfg.family`` instead of branching on family strings:

* ``config_from_hf`` / ``hf_config``: ``ModelConfig`` from / to a transformers ``config.json`` dict;
* ``top_names`` / ``layer_names``: the HF tensor name ↔ param path mapping (the param layout);
* ``block``: the :class:`BlockOptions` the generic block of ``models/layers.py`` runs with;
* ``random_config``: the config of a random model of given dimensions (``models/random_model.py``).

Param tree (plain nested dicts of arrays; per-layer leaves stacked on a leading layer axis ``N``;
dense kernels in the Flax ``(in, out)`` layout).  Which leaves exist is the family's mapping; the
shape of a leaf depends only on its path (:func:`leaf_shape`)::

    embed/wte (V, d)   embed/wpe (P, d)   ln_f/{scale,bias} (d,)   lm_head/kernel (d, V)   lm_head/bias (V,)
    layers/ln_1/{scale,bias}, layers/ln_2/{scale,bias}       (N, d)
    layers/attn/{q,k,v,o}/kernel   (N, d, H·hd), (N, d, Hkv·hd), (N, d, Hkv·hd), (N, H·hd, d)
    layers/attn/{q,k,v,o}/bias     (N, H·hd), (N, Hkv·hd), (N, Hkv·hd), (N, d)
    layers/attn/{q_norm,k_norm}/scale (N, hd)
    layers/mlp/{fc_in,gate,up}/kernel (N, d, d_key)    layers/mlp/fc_in/bias (N, d_key)
    layers/mlp/fc_out/kernel (N, d_key, d)  <- W_outᵀ of docs/FORMULAS.md §1, the edited weight
    layers/mlp/fc_out/bias   (N, d)
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Literal, Mapping, NamedTuple

from flax import traverse_util

from models.config import ModelConfig

Path = tuple[str, ...]

__all__ = ["BlockOptions", "Family", "HFName", "first_id", "hf_common", "leaf_shape", "lm_head_names", "model_type", "name", "Path"]


@dataclasses.dataclass(frozen=True)
class BlockOptions:
    """How the generic transformer block (``models/layers.py``) runs for a family (static, hashable).

    norm:  ``"layer"`` (LayerNorm with bias) or ``"rms"`` (RMSNorm).
    rope:  ``"none"``, ``"interleaved"`` (GPT-J pairs (2i, 2i+1)) or ``"half"`` (NeoX/Llama halves),
           applied to the first ``cfg.rotary_dim or hd`` dims of each head.
    parallel: attention and MLP both read ``norm(ln_1, x)`` and are added to x together (GPT-J, Phi);
           otherwise sequential with a second norm ``ln_2`` before the MLP.
    gated_mlp: key = act(gate·x) ⊙ (up·x) (Llama); otherwise key = act(fc_in·x + b).
    activation: ``"gelu_new"`` (tanh GELU) or ``"silu"``.
    learned_positions: add ``embed/wpe[position]`` to the token embedding (GPT-2).
    """

    norm: Literal["layer", "rms"]
    rope: Literal["none", "interleaved", "half"]
    parallel: bool
    gated_mlp: bool
    activation: Literal["gelu_new", "silu"]
    learned_positions: bool = False


class HFName(NamedTuple):
    """One HF tensor ↔ our param path(s).

    hf:        HF tensor name; for per-layer names relative to ``Family.layer_prefix``.
    paths:     our param path(s); several paths mean the HF tensor is their concatenation along the
               last axis, in order (GPT-2's fused ``c_attn``).
    transpose: the HF tensor is a torch ``Linear`` weight ``(out, in)`` (ours is ``(in, out)``).
    """

    hf: str
    paths: tuple[Path, ...]
    transpose: bool = False


def name(hf: str, *paths: str, t: bool = False) -> HFName:
    """Shorthand: ``name("mlp.fc2.weight", "mlp/fc_out/kernel", t=True)``."""
    return HFName(hf, tuple(tuple(p.split("/")) for p in paths), t)


def leaf_shape(cfg: ModelConfig, path: Path) -> tuple[int, ...]:
    """Shape of the param leaf at ``path`` (per-layer leaves without the leading ``N``).

    Raises KeyError for a path outside the layout of the module docstring.
    """
    d, dk, hd = cfg.d_model, cfg.d_key, cfg.hd
    hq, hkv = cfg.n_heads * hd, cfg.kv_heads * hd
    table: dict[Path, tuple[int, ...]] = {
        ("embed", "wte"): (cfg.vocab_size, d), ("embed", "wpe"): (cfg.max_positions, d),
        ("ln_f", "scale"): (d,), ("ln_f", "bias"): (d,),
        ("lm_head", "kernel"): (d, cfg.vocab_size), ("lm_head", "bias"): (cfg.vocab_size,),
        ("ln_1", "scale"): (d,), ("ln_1", "bias"): (d,), ("ln_2", "scale"): (d,), ("ln_2", "bias"): (d,),
        ("attn", "q", "kernel"): (d, hq), ("attn", "k", "kernel"): (d, hkv), ("attn", "v", "kernel"): (d, hkv),
        ("attn", "o", "kernel"): (hq, d),
        ("attn", "q", "bias"): (hq,), ("attn", "k", "bias"): (hkv,), ("attn", "v", "bias"): (hkv,),
        ("attn", "o", "bias"): (d,),
        ("attn", "q_norm", "scale"): (hd,), ("attn", "k_norm", "scale"): (hd,),
        ("mlp", "fc_in", "kernel"): (d, dk), ("mlp", "fc_in", "bias"): (dk,),
        ("mlp", "gate", "kernel"): (d, dk), ("mlp", "up", "kernel"): (d, dk),
        ("mlp", "fc_out", "kernel"): (dk, d), ("mlp", "fc_out", "bias"): (d,),
    }
    return table[path]


def hf_common(cfg: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` fields every family writes the same way."""
    return {"vocab_size": cfg.vocab_size, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
            "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32", "dtype": "float32"}


def lm_head_names(cfg: ModelConfig, *, bias: bool) -> list[HFName]:
    """``lm_head.weight`` (a torch Linear; absent when tied to the embedding) and ``lm_head.bias``."""
    out = [] if cfg.tie_embeddings else [name("lm_head.weight", "lm_head/kernel", t=True)]
    return out + ([name("lm_head.bias", "lm_head/bias")] if bias else [])


def model_type(hf: Mapping[str, Any]) -> str:
    """The lowercase ``model_type`` of an HF ``config.json`` dict ("" when absent)."""
    return str(hf.get("model_type", "")).lower()


def first_id(x: Any) -> int | None:
    """A token id from a ``config.json`` field that may be a list (first entry) or absent."""
    if isinstance(x, (list, tuple)):
        return x[0] if x else None
    return x


class Family(abc.ABC):
    """A model family: subclass it in ``models/families/<name>.py`` and add the module to the registry.

    Class attributes:
      name:          the ``ModelConfig.family`` value.
      model_types:   HF ``model_type`` values read as this family (the first is the default export).
      body_prefix:   HF prefix of the decoder body (``"model."``); ``layer_prefix`` that of layer i
                     (``"model.layers.{}."``).
      legacy_unprefixed: checkpoints may name body tensors without ``body_prefix`` (old GPT-2/GPT-J).
      ignored_suffixes: HF tensors that are buffers, not weights (skipped when present).
      random_variants: ``random:<variant>`` names → ``ModelConfig`` overrides (``models/random_model.py``);
                     default: the family name alone, no overrides.
    """

    name: str
    model_types: tuple[str, ...]
    body_prefix: str = "model."
    layer_prefix: str = "model.layers.{}."
    legacy_unprefixed: bool = False
    ignored_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)
    random_variants: Mapping[str, Mapping[str, Any]] | None = None  # None: {name: {}}

    @abc.abstractmethod
    def config_from_hf(self, hf: Mapping[str, Any], *, name: str = "model") -> ModelConfig:
        """``ModelConfig`` from an HF ``config.json`` dict; ConversionError for unsupported options."""

    @abc.abstractmethod
    def hf_config(self, cfg: ModelConfig, model_type: str | None = None) -> dict[str, Any]:
        """The transformers ``config.json`` dict of ``cfg`` (ConversionError if it cannot be written)."""

    def hf_model_type(self, cfg: ModelConfig) -> str:
        """The HF ``model_type`` an export of ``cfg`` gets by default."""
        return self.model_types[0]

    @abc.abstractmethod
    def block(self, cfg: ModelConfig) -> BlockOptions:
        """Options of the generic block for ``cfg``."""

    @abc.abstractmethod
    def top_names(self, cfg: ModelConfig) -> list[HFName]:
        """HF names of the tensors outside the layer stack (embeddings, final norm, head)."""

    @abc.abstractmethod
    def layer_names(self, cfg: ModelConfig) -> list[HFName]:
        """HF names (relative to ``layer_prefix``) of one layer's tensors."""

    @abc.abstractmethod
    def random_config(self, full_size: bool, **dims: Any) -> ModelConfig:
        """Config of a random model (``models/random_model.py``).

        dims: ModelConfig fields (vocab_size, d_model, n_layers, n_heads, n_kv_heads, d_ff, name,
        dtypes, a variant's overrides); ``full_size``: the shape of a released model (True) or a
        tiny test model (False), for settings that differ between them (Llama's rope_theta).
        """

    # ------------------------------------------------------------------ derived from the mapping

    def param_shapes(self, cfg: ModelConfig) -> dict[str, Any]:
        """Nested dict of leaf shapes (tuples) of ``cfg``'s param tree, layer leaves with ``N`` first."""
        flat: dict[Path, tuple[int, ...]] = {}
        for n in self.top_names(cfg):
            flat.update({p: leaf_shape(cfg, p) for p in n.paths})
        for n in self.layer_names(cfg):
            flat.update({("layers", *p): (cfg.n_layers, *leaf_shape(cfg, p)) for p in n.paths})
        return traverse_util.unflatten_dict(flat)

    def canonical_names(self, names: list[str]) -> dict[str, str]:
        """Raw checkpoint names → {canonical HF name: raw name} (adds a missing legacy body prefix)."""
        out = {}
        for n in names:
            legacy = self.legacy_unprefixed and not n.startswith((self.body_prefix, "lm_head."))
            out[self.body_prefix + n if legacy else n] = n
        return out

