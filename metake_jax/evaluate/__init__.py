"""Benchmark metrics (docs/FORMULAS.md §8; §R7–§R8): batched jitted scoring, CounterFact,
ZsRE, general-capability (GLUE/MMLU) and text metrics.  Submodules import the model code lazily
where it is optional (generation)."""
from metake_jax.evaluate.classification import accuracy, matthews_corrcoef, weighted_f1
from metake_jax.evaluate.counterfact import evaluate_counterfact, harmonic_mean, load_reference_stats
from metake_jax.evaluate.glue import evaluate_glue
from metake_jax.evaluate.scoring import PairScores, encode_pairs, score_pairs, score_rows, target_logprobs
from metake_jax.evaluate.text_metrics import TfidfModel, ngram_entropy, text_ngram_entropy, word_tokenize
from metake_jax.evaluate.zsre import evaluate_zsre, neighborhood_argmax

__all__ = [
    "PairScores", "TfidfModel", "accuracy", "encode_pairs", "evaluate_counterfact", "evaluate_glue", "evaluate_zsre",
    "harmonic_mean", "load_reference_stats", "matthews_corrcoef", "neighborhood_argmax", "ngram_entropy",
    "score_pairs", "score_rows", "target_logprobs", "text_ngram_entropy", "weighted_f1", "word_tokenize",
]
