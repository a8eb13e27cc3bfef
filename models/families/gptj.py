"""GPT-J (transformers ``GPTJForCausalLM``): parallel block (one LayerNorm feeds attention and
MLP), interleaved partial rotary on ``rotary_dim`` dims, bias-free attention, gelu_new MLP with
biases, untied LM head with bias."""
from __future__ import annotations

from typing import Any, Mapping

from models.config import ModelConfig
from models.families.base import BlockOptions, HFName, lm_head_names, name
from models.families.gpt2 import GPT2Style, gpt2_style_fields, gpt2_style_hf


class GPTJ(GPT2Style):
    name = "gptj"
    model_types = ("gptj",)

    def config_from_hf(self, hf: Mapping[str, Any], *, name: str = "model") -> ModelConfig:
        return ModelConfig(family=self.name, rotary_dim=hf.get("rotary_dim"),
                           tie_embeddings=bool(hf.get("tie_word_embeddings", False)), lm_head_bias=True, name=name,
                           **gpt2_style_fields(hf, default_positions=2048))

    def hf_config(self, cfg: ModelConfig, model_type: str | None = None) -> dict[str, Any]:
        return {**gpt2_style_hf(cfg), "model_type": "gptj", "architectures": ["GPTJForCausalLM"],
                "rotary_dim": cfg.rotary_dim}

    def block(self, cfg: ModelConfig) -> BlockOptions:
        return BlockOptions(norm="layer", rope="interleaved", parallel=True, gated_mlp=False,
                            activation="gelu_new")

    def top_names(self, cfg: ModelConfig) -> list[HFName]:
        return [name("transformer.wte.weight", "embed/wte"),
                name("transformer.ln_f.weight", "ln_f/scale"), name("transformer.ln_f.bias", "ln_f/bias"),
                *lm_head_names(cfg, bias=True)]

    def layer_names(self, cfg: ModelConfig) -> list[HFName]:
        return [
            name("ln_1.weight", "ln_1/scale"), name("ln_1.bias", "ln_1/bias"),
            *(name(f"attn.{p}_proj.weight", f"attn/{p}/kernel", t=True) for p in "qkv"),
            name("attn.out_proj.weight", "attn/o/kernel", t=True),
            name("mlp.fc_in.weight", "mlp/fc_in/kernel", t=True), name("mlp.fc_in.bias", "mlp/fc_in/bias"),
            name("mlp.fc_out.weight", "mlp/fc_out/kernel", t=True), name("mlp.fc_out.bias", "mlp/fc_out/bias"),
        ]

    def random_config(self, full_size: bool, **dims: Any) -> ModelConfig:
        dims.pop("n_kv_heads", None)
        hd = dims["d_model"] // dims["n_heads"]
        return ModelConfig(family=self.name, max_positions=2048, rotary_dim=max(4, hd // 4), lm_head_bias=True,
                           **dims)


FAMILY = GPTJ()
