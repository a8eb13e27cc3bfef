"""How a user's prompt is joined to the target, measured on SmolLM2-135M-Instruct (issue 13, kinds 3-4).

One edit ("The mother tongue of Zoe Varnok is" -> Latin, invented subject) with AlphaEdit, from the
unedited model each time, in four set-ups:

* ``space/old``  — prompt ``"… is "`` (trailing space), the old join: ``"… is "`` + ``" Latin"``;
* ``space/new``  — the same prompt through ``requests.join_target``: ``"… is"`` + ``" Latin"``;
* ``chat/old``   — the prompt wrapped in the chat template by hand, the old join: ``"…assistant\\n"`` + ``" Latin"``;
* ``chat/new``   — ``config.data.chat`` (``tokens.chat_format``): ``"…assistant\\n"`` + ``"Latin"``.

After each edit: P(target | prefix) for the natural and the trained forms (product over the target
tokens, ``scoring.score_pairs``), the top-1 next token after the chat prompt, and the greedy chat
answer.  ``old`` is the behaviour before issue 13, reproduced by patching the join in
``metake_jax.batch``.

    python bench/chat_smollm2.py            # ~5 min on 2 CPU cores; figures in bench/RESULTS.md
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402

from configs.smollm2_cf import SMOLLM2_TUNED  # noqa: E402
from metake_jax import batch as batch_mod  # noqa: E402
from metake_jax.editor import EditConfig, edit_batch, init_state  # noqa: E402
from metake_jax.evaluate.scoring import score_pairs  # noqa: E402
from metake_jax.projector import projectors_for_layers  # noqa: E402
from metake_jax.requests import EditRequest, target_text  # noqa: E402
from metake_jax.stats import CorpusSpec, layer_stats  # noqa: E402
from metake_jax.targets import StageIConfig  # noqa: E402
from metake_jax.tokens import chat_format  # noqa: E402
from metake_jax.editors.alphaedit import AlphaEdit  # noqa: E402
from models.embedded import load_smollm2  # noqa: E402
from metake_jax.templates import context_templates  # noqa: E402
from models.generate import generate  # noqa: E402

PROMPT = "The mother tongue of {} is"
SUBJECT, NEW, TRUE = "Zoe Varnok", "Latin", "French"


def prob(cfg, params, tok, prefix: str, cont: str) -> float:
    """P(cont | prefix): product over the continuation's tokens."""
    s = score_pairs(cfg, params, tok, [prefix], [cont])
    return float(np.exp(-s.mean_nll[0] * s.n_tokens[0]))


def greedy(cfg, params, tok, prefix: str, n: int = 6) -> tuple[str, str]:
    ids = tok(prefix)["input_ids"]
    out = generate(cfg, params, np.asarray([ids]), np.ones((1, len(ids)), bool), max_new_tokens=n,
                   eos_token_id=tok.eos_token_id)
    new = np.asarray(out.tokens)[0, len(ids):][np.asarray(out.mask)[0, len(ids):]]
    return tok.decode([int(new[0])]), tok.decode(new.tolist(), skip_special_tokens=True)


def old_join(chat_wrap):
    """The join before issue 13: the prompt as given (chat-wrapped by hand), target with a forced space."""
    batch_mod.prompt_text = lambda p, chat=None: chat_wrap(p) if chat_wrap else p
    batch_mod.join_target = lambda p, t, chat=None: (p, target_text(t))


def main() -> None:
    t0 = time.perf_counter()
    cfg, params, tok = load_smollm2()
    chat = chat_format(tok)
    layers = tuple(SMOLLM2_TUNED["layers"])
    templates = context_templates(cfg, params, tok, seed=0, length=5)
    C0 = layer_stats(cfg, params, tok, layers, CorpusSpec(kind="model", seed=1), n_samples=64, max_len=64,
                     cache_dir=Path(os.environ.get("METAKE_CACHE") or "~/.cache/metake-jax").expanduser() / "stats",
                     model_id="smollm2-135m-instruct")
    P, _ = projectors_for_layers(C0, threshold=2e-2)
    ecfg = EditConfig(layers=layers, stage1=StageIConfig(lr=SMOLLM2_TUNED["lr"], steps=SMOLLM2_TUNED["steps"]),
                      editor=AlphaEdit(l2=10.0))
    plain = PROMPT.replace("{}", SUBJECT)
    chat_prefix = chat.wrap(plain)
    real = (batch_mod.prompt_text, batch_mod.join_target)

    def measure(p) -> dict:
        first, answer = greedy(cfg, p, tok, chat_prefix)
        return {  # P(continuation after prefix); "chat" = the chat template's generation prompt
            "' Latin' after '… is'": prob(cfg, p, tok, plain, " " + NEW),
            "'Latin' after '… is '": prob(cfg, p, tok, plain + " ", NEW),
            "'Latin' after chat": prob(cfg, p, tok, chat_prefix, NEW),
            "' Latin' after chat": prob(cfg, p, tok, chat_prefix, " " + NEW),
            "chat top-1": first, "chat answer": answer,
        }

    rows = {"unedited": measure(params)}
    for name, prompt, use_chat, old in (("space/old", PROMPT + " ", False, True), ("space/new", PROMPT + " ", False, False),
                                        ("chat/old", PROMPT, True, True), ("chat/new", PROMPT, True, False)):
        batch_mod.prompt_text, batch_mod.join_target = real
        if old:
            old_join(chat.wrap if use_chat else None)
        req = EditRequest(case_id=7, subject=SUBJECT, prompt=prompt, target_new=NEW, target_true=TRUE)
        t = time.perf_counter()
        state, rep = edit_batch(cfg, init_state(params, cfg, layers, P=P), tok, [req], templates, ecfg,
                                chat=chat if use_chat and not old else None)
        rows[name] = {**measure(state.params), "stage1 loss": float(rep.stage1_losses[-1, 0]),
                      "edit s": round(time.perf_counter() - t, 1)}
        print(name, json.dumps(rows[name], ensure_ascii=False), flush=True)
    batch_mod.prompt_text, batch_mod.join_target = real
    keys = list(rows["unedited"])
    print("\n| set-up | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else repr(r[k]) for k in keys) + " |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
