"""Phi-1 / Phi-1.5 / Phi-2 (transformers ``PhiForCausalLM``; MetaKE paper D.2): parallel block
(one LayerNorm feeds attention and MLP, both added to the residual), partial NeoX rotary on the
first ``partial_rotary_factor·hd`` dims of each head, biases on every projection (``dense`` is
the attention output, ``fc1`` / ``fc2`` the MLP), gelu_new, final LayerNorm, LM head with bias.
"""
from __future__ import annotations

from typing import Any, Mapping

from models.config import ModelConfig
from models.errors import ConversionError
from models.families.base import BlockOptions, Family, HFName, first_id, hf_common, lm_head_names, name


class Phi(Family):
    name = "phi"
    model_types = ("phi",)

    def config_from_hf(self, hf: Mapping[str, Any], *, name: str = "model") -> ModelConfig:
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        if rope.get("rope_type", rope.get("type", "default")) not in (None, "default"):
            raise ConversionError(f"phi: rope_type={rope.get('rope_type', rope.get('type'))!r} is not supported")
        if hf.get("qk_layernorm"):
            raise ConversionError("phi: qk_layernorm=True is not supported")
        if hf.get("hidden_act", "gelu_new") != "gelu_new":
            raise ConversionError(f"phi: hidden_act={hf['hidden_act']!r} is not supported (gelu_new only)")
        d, heads = hf["hidden_size"], hf["num_attention_heads"]
        hd = hf.get("head_dim") or d // heads
        factor = hf.get("partial_rotary_factor", rope.get("partial_rotary_factor", 0.5))
        return ModelConfig(
            family=self.name, vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"],
            n_heads=heads, n_kv_heads=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim"),
            d_ff=hf["intermediate_size"], max_positions=hf.get("max_position_embeddings", 2048),
            norm_eps=hf.get("layer_norm_eps", 1e-5), rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 1e4))),
            rotary_dim=int(hd * factor), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            lm_head_bias=True, attn_bias=True, activation="gelu_new", name=name,
            bos_token_id=hf.get("bos_token_id"), eos_token_id=first_id(hf.get("eos_token_id")),
        )

    def hf_config(self, cfg: ModelConfig, model_type: str | None = None) -> dict[str, Any]:
        factor = (cfg.rotary_dim or cfg.hd) / cfg.hd
        return {**hf_common(cfg), "model_type": "phi", "architectures": ["PhiForCausalLM"],
                "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
                "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.hd,
                "max_position_embeddings": cfg.max_positions, "layer_norm_eps": cfg.norm_eps,
                "hidden_act": "gelu_new", "rope_theta": cfg.rope_theta, "partial_rotary_factor": factor,
                "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                                    "partial_rotary_factor": factor},
                "qk_layernorm": False, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0}

    def block(self, cfg: ModelConfig) -> BlockOptions:
        return BlockOptions(norm="layer", rope="half", parallel=True, gated_mlp=False, activation="gelu_new")

    def top_names(self, cfg: ModelConfig) -> list[HFName]:
        return [name("model.embed_tokens.weight", "embed/wte"), name("model.final_layernorm.weight", "ln_f/scale"),
                name("model.final_layernorm.bias", "ln_f/bias"), *lm_head_names(cfg, bias=True)]

    def layer_names(self, cfg: ModelConfig) -> list[HFName]:
        linear = {"self_attn.q_proj": "attn/q", "self_attn.k_proj": "attn/k", "self_attn.v_proj": "attn/v",
                  "self_attn.dense": "attn/o", "mlp.fc1": "mlp/fc_in", "mlp.fc2": "mlp/fc_out"}
        return [name("input_layernorm.weight", "ln_1/scale"), name("input_layernorm.bias", "ln_1/bias"),
                *(name(f"{hf}.weight", f"{ours}/kernel", t=True) for hf, ours in linear.items()),
                *(name(f"{hf}.bias", f"{ours}/bias") for hf, ours in linear.items())]

    def random_config(self, full_size: bool, **dims: Any) -> ModelConfig:
        hd = dims["d_model"] // dims["n_heads"]
        return ModelConfig(family=self.name, max_positions=2048, rotary_dim=max(2, hd // 2), lm_head_bias=True,
                           attn_bias=True, **dims)


FAMILY = Phi()
