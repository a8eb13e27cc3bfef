"""The Llama family (transformers ``LlamaForCausalLM`` and its relatives as options): RMSNorm,
sequential block, half-split (NeoX) rotary on the whole head, GQA, SwiGLU MLP, no biases.

Options: Qwen2 (``attn_bias``: q/k/v biases), Qwen3 (``qk_norm``: RMSNorm of q and k per head,
``head_dim`` may differ from d/H), Mistral and SmolLM2 (plain Llama); tied or untied LM head.
"""
from __future__ import annotations

from typing import Any, Mapping

from models.config import ModelConfig
from models.errors import ConversionError
from models.families.base import BlockOptions, Family, HFName, first_id, hf_common, lm_head_names, model_type, name

_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def rope_theta(hf: Mapping[str, Any], mt: str) -> float:
    """``rope_theta`` of a config dict (top level or ``rope_parameters`` / ``rope_scaling``);
    ConversionError for a scaled rotary (only ``default`` is implemented)."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if rtype not in (None, "default"):
        raise ConversionError(f"rope_type={rtype!r} is not supported (model_type={mt!r})")
    return float(hf.get("rope_theta", rope.get("rope_theta", 10000.0)))


class Llama(Family):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3", "smollm2")
    random_variants = {"llama": {}, "qwen2": {"attn_bias": True}, "qwen3": {"qk_norm": True}}

    def config_from_hf(self, hf: Mapping[str, Any], *, name: str = "model") -> ModelConfig:
        mt = model_type(hf)
        return ModelConfig(
            family=self.name, vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim"),
            d_ff=hf["intermediate_size"], max_positions=hf.get("max_position_embeddings", 2048),
            norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=rope_theta(hf, mt),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attn_bias=bool(hf.get("attention_bias", mt == "qwen2")), qk_norm=(mt == "qwen3"),
            activation="silu", name=name, bos_token_id=hf.get("bos_token_id"),
            eos_token_id=first_id(hf.get("eos_token_id")),
        )

    def hf_model_type(self, cfg: ModelConfig) -> str:
        return "qwen3" if cfg.qk_norm else "qwen2" if cfg.attn_bias else "llama"

    def hf_config(self, cfg: ModelConfig, model_type: str | None = None) -> dict[str, Any]:
        mt = model_type or self.hf_model_type(cfg)
        if mt not in _ARCH:
            raise ConversionError(f"cannot export model_type {mt!r}; supported: gpt2, gptj, llama, qwen2, qwen3, phi")
        if mt == "llama" and cfg.attn_bias:
            raise ConversionError("llama export cannot express q/k/v-only bias; use model_type='qwen2'")
        if (mt == "qwen3") != cfg.qk_norm:
            raise ConversionError(f"model_type {mt!r} does not match qk_norm={cfg.qk_norm}")
        if mt == "qwen2" and not cfg.attn_bias:
            raise ConversionError("qwen2 export needs attn_bias=True (q/k/v bias)")
        out = {**hf_common(cfg), "model_type": mt, "architectures": [_ARCH[mt]], "hidden_size": cfg.d_model,
               "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
               "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.hd,
               "max_position_embeddings": cfg.max_positions, "rms_norm_eps": cfg.norm_eps,
               "rope_theta": cfg.rope_theta,
               "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
               "hidden_act": "silu", "attention_dropout": 0.0}
        if mt == "llama":
            out.update(attention_bias=False, mlp_bias=False)
        if mt == "qwen3":
            out.update(attention_bias=False, use_sliding_window=False)
        if mt == "qwen2":
            out.update(use_sliding_window=False)
        return out

    def block(self, cfg: ModelConfig) -> BlockOptions:
        return BlockOptions(norm="rms", rope="half", parallel=False, gated_mlp=True, activation="silu")

    def top_names(self, cfg: ModelConfig) -> list[HFName]:
        return [name("model.embed_tokens.weight", "embed/wte"), name("model.norm.weight", "ln_f/scale"),
                *lm_head_names(cfg, bias=False)]

    def layer_names(self, cfg: ModelConfig) -> list[HFName]:
        out = [
            name("input_layernorm.weight", "ln_1/scale"), name("post_attention_layernorm.weight", "ln_2/scale"),
            *(name(f"self_attn.{p}_proj.weight", f"attn/{p}/kernel", t=True) for p in "qkvo"),
            name("mlp.gate_proj.weight", "mlp/gate/kernel", t=True), name("mlp.up_proj.weight", "mlp/up/kernel", t=True),
            name("mlp.down_proj.weight", "mlp/fc_out/kernel", t=True),
        ]
        if cfg.attn_bias:
            out += [name(f"self_attn.{p}_proj.bias", f"attn/{p}/bias") for p in "qkv"]
        if cfg.qk_norm:
            out += [name(f"self_attn.{p}_norm.weight", f"attn/{p}_norm/scale") for p in "qk"]
        return out

    def random_config(self, full_size: bool, **dims: Any) -> ModelConfig:
        dims["n_kv_heads"] = dims.get("n_kv_heads") or dims["n_heads"]
        return ModelConfig(family=self.name, activation="silu", norm_eps=1e-5,
                           rope_theta=500000.0 if full_size else 10000.0, max_positions=4096, **dims)


FAMILY = Llama()
