"""Unedited-model benchmark figures (docs/FORMULAS.md §8): CounterFact / ZsRE / GLUE metrics of a model.

Sanity check for the evaluation code and the demo set: an unedited model should have low Efficacy
(it prefers the true object) and high Specificity on facts it knows.

    PYTHONPATH=. python bench/eval_baseline.py                       # embedded SmolLM2-135M, demo set
    PYTHONPATH=. python bench/eval_baseline.py --model DIR --counterfact ../shared/data/counterfact_easyedit/counterfact-edit.json --n 200
"""
from __future__ import annotations

import argparse
import json
import time

from metake_jax.data import load_cases, load_demo
from metake_jax.evaluate import evaluate_counterfact, evaluate_glue, evaluate_zsre


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="models.load.load_model spec (default: embedded SmolLM2-135M)")
    ap.add_argument("--counterfact", default=None, help="CounterFact file (default: the bundled demo set)")
    ap.add_argument("--zsre", default=None, help="ZsRE MEND-format file (optional)")
    ap.add_argument("--n", type=int, default=None, help="cases to evaluate (first n, or seeded with --seed)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--glue-n", type=int, default=0, help="examples per GLUE task (0 = skip)")
    ap.add_argument("--glue-dir", default=None)
    ap.add_argument("--fluency", action="store_true", help="also sample generations for Fluency")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    if args.model is None:
        from models.embedded import load_smollm2

        cfg, params, tok = load_smollm2()
    else:
        from models.load import load_model

        cfg, params, tok = load_model(args.model)
    print(f"model {cfg.name}: family={cfg.family} layers={cfg.n_layers} d={cfg.d_model} V={cfg.vocab_size}")

    cases = load_demo(args.n, args.seed, tok) if args.counterfact is None else load_cases(
        args.counterfact, n=args.n, seed=args.seed, tokenizer=tok)
    t = time.perf_counter()
    r = evaluate_counterfact(cfg, params, tok, cases, batch_size=args.batch_size, fluency=args.fluency)
    dt = time.perf_counter() - t
    print(f"CounterFact ({len(cases)} cases, {dt:.1f} s incl. compile):")
    print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in r["summary"].items()}, indent=1))
    print("notes:", r["notes"])
    if args.zsre:
        z = load_cases(args.zsre, "zsre", n=args.n, seed=args.seed, tokenizer=tok)
        t = time.perf_counter()
        rz = evaluate_zsre(cfg, params, tok, z, batch_size=args.batch_size)
        print(f"ZsRE ({len(z)} cases, {time.perf_counter() - t:.1f} s):",
              {k: (round(v, 2) if isinstance(v, float) else v) for k, v in rz["summary"].items()})
    if args.glue_n:
        t = time.perf_counter()
        g = evaluate_glue(cfg, params, tok, data_dir=args.glue_dir, n=args.glue_n, batch_size=min(args.batch_size, 16))
        if g is not None:
            print(f"GLUE ({args.glue_n}/task, {time.perf_counter() - t:.1f} s):")
            for name, res in g["tasks"].items():
                print(f"  {name:5s} acc_new={res['accuracy_new']:.3f} f1_new={res['f1_new']:.3f} "
                      f"mcc_new={res['mcc_new']:.3f}" + (f" | gen f1={res['f1']:.3f} invalid={res['invalid']}"
                                                         if "f1" in res else ""))


if __name__ == "__main__":
    main()
