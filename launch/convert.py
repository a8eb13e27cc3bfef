"""Convert a checkpoint to our param tree, optionally save / export it, and sanity-check it.

    python launch/convert.py --model=smollm2 --predict
    python launch/convert.py --model=/path/to/hf_dir --out=/tmp/conv --export_hf=/tmp/hf_out
    python launch/convert.py --model=/path/to/model.gguf --dtype=bfloat16 --predict

``--model`` accepts everything ``models.load.load_model`` does: ``smollm2`` (the embedded
SmolLM2-135M-Instruct), ``random:<family>[:<size>]``, a ``.gguf`` file, a converted (orbax)
directory, an HF checkpoint directory, or a hub id (online only).  ``--predict`` prints the greedy next token for a few
factual prompts, from one jitted, padded batch through ``models.interface.forward``.
"""
from __future__ import annotations

import os
import time

from absl import flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2", "smollm2 | random:<family>[:<size>] | .gguf file | converted dir | HF dir | hub id")
flags.DEFINE_string("out", None, "save the converted tree (orbax) + config + tokenizer here")
flags.DEFINE_string("export_hf", None, "also export an HF checkpoint (config.json + model.safetensors) here")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "parameter / compute dtype (default: as stored)")
flags.DEFINE_bool("predict", False, "print greedy next-token predictions for factual prompts")
flags.DEFINE_integer("top_k", 3, "alternatives shown per prompt with --predict")

PROMPTS = (
    "The capital of France is",
    "The Eiffel Tower is located in the city of",
    "The mother tongue of Danielle Darrieux is",
    "Apple was founded by Steve",
    "The capital of Japan is",
    "Michael Jordan played the sport of",
    "The largest planet in our solar system is",
    "Water is made of hydrogen and",
)


def predict(cfg, params, tokenizer, prompts=PROMPTS, top_k: int = 3) -> list[tuple[str, str]]:
    """Greedy next token of every prompt: one right-padded batch, one jitted forward."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from models.interface import forward

    enc = tokenizer(list(prompts), padding="longest", return_tensors="np")
    tokens, mask = jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"])
    last = jnp.asarray(np.asarray(enc["attention_mask"]).sum(1) - 1)

    @jax.jit
    def next_token_logprobs(params, tokens, mask, last):
        logits = forward(cfg, params, tokens, mask).logits  # (B, T, V)
        at_last = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
        return jax.nn.log_softmax(at_last, axis=-1)

    logp = np.asarray(next_token_logprobs(params, tokens, mask, last))
    out = []
    for prompt, row in zip(prompts, logp):
        best = np.argsort(-row)[:top_k]
        alts = ", ".join(f"{tokenizer.decode([int(t)])!r} {np.exp(row[t]):.2f}" for t in best)
        out.append((prompt, tokenizer.decode([int(best[0])])))
        print(f"{prompt!r} -> {tokenizer.decode([int(best[0])])!r}   [{alts}]")
    return out


def main(argv):
    del argv
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
    from models import convert, load

    t0 = time.perf_counter()
    cfg, params, tok = load.load_model(FLAGS.model, dtype=FLAGS.dtype)
    import jax

    n = sum(x.size for x in jax.tree.leaves(params))
    print(f"loaded {FLAGS.model!r}: {cfg.family} ({cfg.name}) d={cfg.d_model} L={cfg.n_layers} "
          f"d_k={cfg.d_ff} vocab={cfg.vocab_size} params={n / 1e6:.1f}M dtype={cfg.param_dtype} "
          f"in {time.perf_counter() - t0:.1f}s")
    if FLAGS.out:
        print("saved converted model to", convert.save_converted(FLAGS.out, cfg, params, tokenizer=tok))
    if FLAGS.export_hf:
        print("exported HF checkpoint to", convert.export_hf(FLAGS.export_hf, cfg, params, tokenizer=tok))
    if FLAGS.predict:
        if tok is None:
            from launch._common import fail

            fail(f"--predict needs a tokenizer; none found for {FLAGS.model!r}")
        predict(cfg, params, tok, top_k=FLAGS.top_k)


if __name__ == "__main__":
    from launch._common import run_cli

    run_cli(main)
