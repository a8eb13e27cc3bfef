"""GPT-2 (transformers ``GPT2LMHeadModel``): learned positions, LayerNorm, sequential block,
fused ``c_attn`` Conv1D (already ``(in, out)``), tied embeddings, gelu_new MLP with biases."""
from __future__ import annotations

import abc
from typing import Any, Mapping

from models.config import ModelConfig
from models.errors import ConversionError
from models.families.base import BlockOptions, Family, HFName, hf_common, name


def gpt2_style_fields(hf: Mapping[str, Any], *, default_positions: int) -> dict[str, Any]:
    """ModelConfig fields from a GPT-2-style ``config.json`` (``n_embd``, ``n_layer``, ...; GPT-2, GPT-J)."""
    d = hf["n_embd"]
    return dict(vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], n_heads=hf["n_head"],
                d_ff=hf.get("n_inner") or 4 * d, max_positions=hf.get("n_positions", default_positions),
                norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation="gelu_new",
                bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"))


def gpt2_style_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The GPT-2-style ``config.json`` fields of ``cfg`` (inverse of ``gpt2_style_fields``), dropout off."""
    return {**hf_common(cfg), "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
            "n_inner": cfg.d_ff, "n_positions": cfg.max_positions, "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": "gelu_new", "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


class GPT2Style(Family, abc.ABC):
    """HF naming shared by GPT-2 and GPT-J: ``transformer.h.{i}.``, legacy unprefixed names, buffers."""

    body_prefix = "transformer."
    layer_prefix = "transformer.h.{}."
    legacy_unprefixed = True
    ignored_suffixes = Family.ignored_suffixes + (".attn.bias", ".attn.masked_bias", ".attn.embed_positions")


class GPT2(GPT2Style):
    name = "gpt2"
    model_types = ("gpt2",)

    def config_from_hf(self, hf: Mapping[str, Any], *, name: str = "model") -> ModelConfig:
        return ModelConfig(family=self.name, tie_embeddings=True, name=name,
                           **gpt2_style_fields(hf, default_positions=1024))

    def hf_config(self, cfg: ModelConfig, model_type: str | None = None) -> dict[str, Any]:
        if not cfg.tie_embeddings:
            raise ConversionError("gpt2 export needs tied embeddings")
        return {**gpt2_style_hf(cfg), "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                "n_ctx": cfg.max_positions}

    def block(self, cfg: ModelConfig) -> BlockOptions:
        return BlockOptions(norm="layer", rope="none", parallel=False, gated_mlp=False,
                            activation="gelu_new", learned_positions=True)

    def top_names(self, cfg: ModelConfig) -> list[HFName]:
        return [name("transformer.wte.weight", "embed/wte"), name("transformer.wpe.weight", "embed/wpe"),
                name("transformer.ln_f.weight", "ln_f/scale"), name("transformer.ln_f.bias", "ln_f/bias")]

    def layer_names(self, cfg: ModelConfig) -> list[HFName]:
        return [
            name("ln_1.weight", "ln_1/scale"), name("ln_1.bias", "ln_1/bias"),
            name("ln_2.weight", "ln_2/scale"), name("ln_2.bias", "ln_2/bias"),
            name("attn.c_attn.weight", "attn/q/kernel", "attn/k/kernel", "attn/v/kernel"),
            name("attn.c_attn.bias", "attn/q/bias", "attn/k/bias", "attn/v/bias"),
            name("attn.c_proj.weight", "attn/o/kernel"), name("attn.c_proj.bias", "attn/o/bias"),
            name("mlp.c_fc.weight", "mlp/fc_in/kernel"), name("mlp.c_fc.bias", "mlp/fc_in/bias"),
            name("mlp.c_proj.weight", "mlp/fc_out/kernel"), name("mlp.c_proj.bias", "mlp/fc_out/bias"),
        ]

    def random_config(self, full_size: bool, **dims: Any) -> ModelConfig:
        dims.pop("n_kv_heads", None)
        return ModelConfig(family=self.name, max_positions=1024, tie_embeddings=True, norm_eps=1e-5, **dims)


FAMILY = GPT2()
