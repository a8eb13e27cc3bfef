"""Tiny random HF checkpoints (torch transformers) for the conversion / parity tests.

Every family the converter supports, with the awkward features turned on: GPT-2 tied Conv1D,
GPT-J lm_head bias + partial interleaved rotary, Llama GQA tied/untied, Qwen2 q/k/v bias,
Qwen3 q/k-norm with head_dim != d/H, Phi parallel block with partial NeoX rotary, GQA and biases.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

VOCAB = 61
FAMILIES = ("gpt2", "gptj", "llama_tied", "llama_untied", "qwen2", "qwen3", "phi")


def build(kind: str, seed: int = 0):
    """A random tiny torch model (eval mode, eager attention) of ``kind`` (one of FAMILIES)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, attn_implementation="eager")
    llama_args = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
    if kind == "gpt2":
        m = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common))
    elif kind == "gptj":
        m = tf.GPTJForCausalLM(tf.GPTJConfig(n_embd=32, n_layer=3, n_head=4, n_positions=64, rotary_dim=4,
                                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                             tie_word_embeddings=False, **common))
    elif kind in ("llama_tied", "llama_untied"):
        m = tf.LlamaForCausalLM(tf.LlamaConfig(tie_word_embeddings=(kind == "llama_tied"), rope_theta=5000.0,
                                               **llama_args, **common))
    elif kind == "qwen2":
        m = tf.Qwen2ForCausalLM(tf.Qwen2Config(tie_word_embeddings=False, **llama_args, **common))
    elif kind == "qwen3":
        args = {**llama_args, "head_dim": 16}
        m = tf.Qwen3ForCausalLM(tf.Qwen3Config(tie_word_embeddings=True, **args, **common))
    elif kind == "phi":
        args = {k: v for k, v in llama_args.items() if k != "rms_norm_eps"}  # GQA 4/2, hd 8, rotary 4
        m = tf.PhiForCausalLM(tf.PhiConfig(partial_rotary_factor=0.5, layer_norm_eps=1e-5, tie_word_embeddings=False,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, **args, **common))
    else:
        raise ValueError(kind)
    m.eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # O(1) logits so that parity checks have teeth
        for name, p in m.named_parameters():
            scale = 0.3 if p.dim() >= 2 else 0.2
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return m


def save(model, directory: Path, **kw) -> Path:
    directory = Path(directory)
    model.save_pretrained(str(directory), **kw)
    return directory


def batch(rng_seed: int = 0, lengths=(7, 4, 2), left: bool = False):
    """Token ids (B, T) and mask (B, T) int64 with the given real lengths, padded right or left."""
    rng = np.random.default_rng(rng_seed)
    t = max(lengths)
    tokens = np.zeros((len(lengths), t), np.int64)
    mask = np.zeros((len(lengths), t), np.int64)
    for i, n in enumerate(lengths):
        sl = slice(t - n, t) if left else slice(0, n)
        tokens[i, sl] = rng.integers(0, VOCAB, n)
        mask[i, sl] = 1
    return tokens, mask


def torch_logits(model, tokens: np.ndarray, mask: np.ndarray, **kw):
    """Torch float32 logits with position ids cumsum(mask) - 1 (left padding aware)."""
    import torch

    ids = torch.as_tensor(tokens)
    m = torch.as_tensor(mask)
    pos = (m.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=m, position_ids=pos, **kw)
    return out


def decoder_layers(model):
    base = getattr(model, "transformer", None) or model.model
    return base.h if hasattr(base, "h") else base.layers


def fc_out_module(model, layer: int):
    mlp = decoder_layers(model)[layer].mlp
    for name in ("c_proj", "fc_out", "down_proj", "fc2"):
        if hasattr(mlp, name):
            return getattr(mlp, name)
    raise AttributeError("no FFN output projection")


def attn_out_module(model, layer: int):
    """The attention output projection of block ``layer`` (PMET's δ_attn site)."""
    blk = decoder_layers(model)[layer]
    attn = getattr(blk, "attn", None) or blk.self_attn
    for name in ("c_proj", "out_proj", "o_proj", "dense"):
        if hasattr(attn, name):
            return getattr(attn, name)
    raise AttributeError("no attention output projection")
