"""Per-batch wall time and peak memory of AlphaEdit vs MetaKE (docs/FORMULAS.md §9; paper: GPT-J, batch 100).

    # real SmolLM2 (embedded), batch 10, 3 batches per method (CPU is fine)
    python bench/edit_speed.py --config=configs/smollm2_cf.py --batch_size=10
    # random weights with GPT-J-6B shapes (accelerator; no tokenizer, data or statistics needed)
    python bench/edit_speed.py --config=configs/gptj_cf.py --random --batch_size=100 --n_batches=2

Requests are synthetic with fixed token lengths (``--prompt_len``, ``--subject_len``,
``--target_len``; templates ``"{}"`` + 5 of ``--template_len`` tokens) through a word-id tokenizer
("w17 w4 ..." -> ids), so any model shape works offline.  C0 is a random PSD matrix per layer and
P its exact null-space projector (``models.random_model.random_stats``), so no statistics
pass is timed.  Each batch is applied on top of the last (C_p accumulates) as in a real run.

Columns are ``BatchReport.timings`` (Stage I, look-ahead, downstream write, cache update) plus the
evaluation of the batch's cases (CounterFact-shaped: 1 rewrite, 2 paraphrase, 10 neighborhood
prompts).  Batch 1 includes compilation; "steady" is the mean over the later batches.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", str(Path(__file__).resolve().parents[1] / "configs" / "smollm2_cf.py"),
                                          "run configuration (model, layers, hyper-parameters)")
flags.DEFINE_bool("random", False, "random weights with the config model's shapes (no checkpoint needed)")
flags.DEFINE_list("methods", ["alphaedit", "metake"], "methods to time")
flags.DEFINE_integer("batch_size", 10, "requests per batch")
flags.DEFINE_integer("n_batches", 3, "sequential batches per method (the first includes compilation)")
flags.DEFINE_integer("prompt_len", 12, "tokens of the filled prompt (subject included)")
flags.DEFINE_integer("subject_len", 3, "tokens of the subject")
flags.DEFINE_integer("target_len", 2, "tokens of the new target")
flags.DEFINE_integer("template_len", 10, "tokens of each of the 5 context-template prefixes")
flags.DEFINE_bool("eval", True, "also time the evaluation of each batch's cases")
flags.DEFINE_integer("seed", 0, "seed of the random weights / statistics")
FLAGS = flags.FLAGS

# config model -> (family, models.random_model size)
RANDOM_SHAPES = {"gpt2-xl": ("gpt2", "gpt2-xl"), "EleutherAI/gpt-j-6B": ("gptj", "gpt-j-6b"),
                 "meta-llama/Meta-Llama-3-8B-Instruct": ("llama", "llama3-8b"), "smollm2": ("llama", "smollm2-135m"),
                 "Qwen/Qwen3-8B": ("qwen3", "llama3-8b")}
STAGES = ("prepare", "stage1", "lookahead", "write", "cache", "eval", "total")  # total = edit_batch total (eval excluded)


class WordTokenizer:
    """Whitespace tokenizer: word ``w<i>`` -> id i (other words hash into the vocabulary)."""

    pad_token_id = 0
    eos_token_id = 0
    bos_token_id = None

    def __init__(self, vocab_size: int) -> None:
        self.V = vocab_size

    def _ids(self, text: str) -> list[int]:
        out = []
        for w in text.split():
            w = w.rstrip(".")
            out.append(int(w[1:]) % self.V if w[:1] == "w" and w[1:].isdigit() else 1 + hash(w) % (self.V - 1))
        return out

    def __call__(self, text, **_):
        if isinstance(text, (list, tuple)):
            return {"input_ids": [self._ids(t) for t in text]}
        return {"input_ids": self._ids(text)}

    def decode(self, ids, **_):
        return " ".join(f"w{int(i)}" for i in ids)

    def __len__(self) -> int:
        return self.V


def fake_cases(n: int, start: int, V: int, rng):
    from metake_jax.requests import Case, EditRequest, NeighborPrompt

    def words(k):
        return " ".join(f"w{int(x)}" for x in rng.integers(2, V, size=k))

    out = []
    for i in range(n):
        subj = words(FLAGS.subject_len)
        rest = max(1, FLAGS.prompt_len - FLAGS.subject_len)
        prompt = words(rest // 2) + " {} " + words(rest - rest // 2)
        req = EditRequest(case_id=start + i, subject=subj, prompt=prompt.strip(),
                          target_new=words(FLAGS.target_len), target_true=words(FLAGS.target_len))
        para = tuple(words(FLAGS.prompt_len) for _ in range(2))
        nb = tuple(NeighborPrompt(words(FLAGS.prompt_len), req.target_true) for _ in range(10))
        out.append(Case(request=req, kind="counterfact", paraphrase_prompts=para, neighborhood=nb))
    return out


def _peak():
    import resource

    import jax

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB
    try:
        st = jax.devices()[0].memory_stats() or {}
        dev = st.get("peak_bytes_in_use", 0) / 2**30 or None
    except Exception:  # noqa: BLE001
        dev = None
    return rss, dev


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    from metake_jax.editor import edit_batch, init_state
    from metake_jax.evaluate import evaluate_counterfact
    from models.random_model import random_config, random_params, random_stats
    import dataclasses

    from metake_jax.runner import RunConfig, edit_config, load_model_spec

    c = RunConfig.of(_CONFIG.value)
    layers = c.layers
    t = time.perf_counter()
    if FLAGS.random:
        if c.model not in RANDOM_SHAPES:
            raise app.UsageError(f"--random: no shape preset for model {c.model!r}; known {sorted(RANDOM_SHAPES)}")
        fam, size = RANDOM_SHAPES[c.model]
        cfg = random_config(fam, size, dtype=c.dtype).replace(remat=c.remat)
        params = random_params(cfg, FLAGS.seed)
        model_desc = f"random {fam} with {size} shapes"
    else:
        cfg, params, _ = load_model_spec(c.model, dtype=c.dtype, seed=FLAGS.seed, remat=c.remat)
        model_desc = c.model
    jax.block_until_ready(params)
    tok = WordTokenizer(cfg.vocab_size)
    C0, P = random_stats(len(layers), cfg.d_ff, FLAGS.seed)
    print(f"model {model_desc}: {cfg.n_layers} layers, d={cfg.d_model}, d_k={cfg.d_ff}, V={cfg.vocab_size}; "
          f"layers {layers}; load {time.perf_counter() - t:.1f}s; device {jax.devices()[0]}")
    rng = np.random.default_rng(FLAGS.seed)
    templates = [["{}"], [" ".join(f"w{int(x)}" for x in rng.integers(2, cfg.vocab_size, FLAGS.template_len)) + " {}"
                          for _ in range(5)]]
    rows = []
    for method in FLAGS.methods:
        c = dataclasses.replace(c, method=method)
        ecfg = edit_config(c)
        state = init_state(params, cfg, layers, P=P, C0=C0 if "C0" in ecfg.editor.needs else None)
        for b in range(FLAGS.n_batches):
            cases = fake_cases(FLAGS.batch_size, b * FLAGS.batch_size, cfg.vocab_size, rng)
            state, rep = edit_batch(cfg, state, tok, [x.request for x in cases], templates, ecfg)
            tm = dict(rep.timings)
            if FLAGS.eval:
                te = time.perf_counter()
                evaluate_counterfact(cfg, state.params, tok, cases, batch_size=c.eval.batch_size)
                tm["eval"] = time.perf_counter() - te
            rss, dev = _peak()
            rows.append((method, b + 1, tm, rss, dev))
            steps = int(np.max(rep.stage1_steps)) + 1  # loss/grad evaluations of the slowest request
            print(f"  {method} batch {b + 1}: " + ", ".join(f"{k} {tm.get(k, 0):.2f}s" for k in STAGES)
                  + f"; Stage I {steps} steps, {tm.get('stage1', 0) / steps:.3f} s/step", flush=True)
        del state
    head = "| method | batch | " + " | ".join(STAGES) + " | peak RSS (GiB) | peak device (GiB) |"
    print("\nPer-batch wall time (s); batch 1 includes compilation; peaks are process-wide maxima so far\n")
    print(head)
    print("|---|---|" + "---:|" * (len(STAGES) + 2))
    for method, b, tm, rss, dev in rows:
        print(f"| {method} | {b} | " + " | ".join(f"{tm.get(k, 0.0):.2f}" for k in STAGES)
              + f" | {rss:.2f} | {'–' if dev is None else f'{dev:.2f}'} |")
    for method in FLAGS.methods:
        steady = [tm for m, b, tm, _, _ in rows if m == method and b > 1]
        if steady:
            print(f"| {method} | steady | " + " | ".join(f"{np.mean([x.get(k, 0.0) for x in steady]):.2f}"
                                                       for k in STAGES) + " | | |")


if __name__ == "__main__":
    app.run(main)
