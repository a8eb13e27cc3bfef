"""Tiny tokenizers and random models for tests (built in-process, no hub access)."""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

CORPUS = [
    "The capital of France is Paris. The capital of Germany is Berlin.",
    "Danielle Darrieux speaks French. The mother tongue of Danielle Darrieux is French.",
    "Edwin of Northumbria follows Christianity. Toko Yasuda plays the guitar and the piano.",
    "The Eiffel Tower is located in Paris. Michael Jordan plays basketball in Chicago.",
    "Therefore, because I said so, you know that the language of Rome is Latin and English.",
    "Apple was founded by Steve Jobs. Microsoft was founded by Bill Gates in Seattle.",
    "Lyon is a twin city of Beirut and Manila. Islam and Christianity are religions.",
]


@functools.lru_cache(maxsize=4)
def tiny_tokenizer(add_bos: bool = False, vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on CORPUS; optionally prepends BOS like Llama 3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    if add_bos:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        bos_token="<s>" if add_bos else "<|endoftext|>",
    )
    return fast


def tiny_hf_model(family: str = "llama", vocab_size: int = 320, seed: int = 0, **kw):
    """A random torch transformers model of the given family (eval mode)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    if family == "gpt2":
        c = tf.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=4, n_head=4, n_positions=128, **kw)
        m = tf.GPT2LMHeadModel(c)
    elif family == "gptj":
        c = tf.GPTJConfig(vocab_size=vocab_size, n_embd=32, n_layer=4, n_head=4, n_positions=128,
                          rotary_dim=4, **kw)
        m = tf.GPTJForCausalLM(c)
    elif family == "llama":
        args = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        args.update(kw)
        c = tf.LlamaConfig(**args)
        m = tf.LlamaForCausalLM(c)
    else:
        raise ValueError(family)
    m.eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def to_jax(m):
    """Convert a torch transformers model to (cfg, params) through models.hf_layout."""
    from models.hf_layout import config_from_hf, hf_to_params

    cfg = config_from_hf(m.config.to_dict())
    sd = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    params = hf_to_params(cfg, list(sd), sd.__getitem__)
    return cfg, _tree_to_jnp(params)


def _tree_to_jnp(t):
    if isinstance(t, dict):
        return {k: _tree_to_jnp(v) for k, v in t.items()}
    return jnp.asarray(np.asarray(t))


def tiny_model(family: str = "llama", seed: int = 0, **kw):
    """(cfg, params) of a random tiny model."""
    return to_jax(tiny_hf_model(family, seed=seed, **kw))
