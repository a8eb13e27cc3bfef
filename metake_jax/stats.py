"""Preserved-knowledge statistics ``C0^l = E[k kᵀ]`` for every edited layer (docs/FORMULAS.md §4, §R3).

One pass over a corpus collects the keys of **all** edited layers (one forward per batch with
``taps=layers`` and ``stop_layer = max(layers) + 1``) and adds ``Σ k kᵀ`` over non-pad tokens in
float32 (reference: float32 sum, divided by the token count, not centered).

Pipeline::

    texts  = load_corpus(spec, n_samples, ...)               # corpus_from_datasets / _files / _model
    tokens = tokenize_corpus(tokenizer, texts, max_len)        # tokenizer(text, truncation=True, max_length=max_len)
    batches = make_batches(tokens, max_len=..., token_budget=...)   # length buckets, static shapes
    sums, count = accumulate_second_moment(cfg, params, batches, layers, mesh=...)
    C0 = sums / count

``layer_stats`` wraps all of it with an on-disk cache: one ``.npz`` per layer holding the float32
SUM, the token count and the cache key (model id, layer, corpus id, n_samples, max_len, dtype);
the key is both in the file name and verified inside.

Length bucketing: a document of ``n`` tokens goes to the bucket ``T = min(max_len, 2^⌈log2 n⌉)``
(at least ``min_len``); a bucket's batches have ``B_T = token_budget // T`` rows (a multiple of the
device count); its last batch is padded with empty rows to a power of two (then to that multiple).
So jit compiles one step per (B, T) shape.  Padding never enters the sum or the count.

With a ``mesh`` the batch axis is split over its ``data`` axis (``jax.jit`` with ``NamedSharding``
in/out shardings; XLA inserts the cross-device reduction); params keep their layout on that mesh
(``sharding.shard_params``) or are replicated, and the sums come out row-sharded (``stats_sharding``).
In a multi-process run each process group (``sharding.process_row_share``: the processes holding
the same rows of the ``data`` axis) tokenizes only its contiguous slice of the documents; the
groups agree on the batch shapes (``make_process_batches``) and each puts its rows with
``jax.make_array_from_process_local_data``; C0 equals the one-process C0 up to summation order.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import random
import re
import socket
from pathlib import Path
from typing import Any, Iterable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from metake_jax.errors import StatsMissingError
from metake_jax.sharding import (
    batch_sharding, mesh_of, mesh_size, pad_to_multiple, process_row_share, put_global, put_process_rows, replicated,
    stats_sharding, to_host,
)
from models.config import ModelConfig
from models.generate import bucket_length
from models.interface import forward

Array = jax.Array
Params = dict[str, Any]
Batch = tuple[np.ndarray, np.ndarray]  # tokens (B, T) int32, mask (B, T) bool

log = logging.getLogger(__name__)

__all__ = [
    "CorpusError", "CorpusSpec", "SEED_PROMPTS", "accumulate_second_moment",
    "corpus_from_datasets", "corpus_from_files", "part_bounds", "corpus_from_model", "corpus_id", "layer_stats",
    "load_corpus", "load_layer_stats", "make_batches", "make_process_batches", "second_moment_step", "stats_key",
    "stats_path", "tokenize_corpus",
]

STATS_DTYPE = "float32"
# matmul precision of the Σ k kᵀ einsum: "highest" = true float32 (the reference: torch float32,
# TF32 off); "high" / "default" let a GPU use TF32 / bf16 passes (at "highest" the d_k² outer products
# took ~2/3 of the statistics pass on an H100 at GPT-J shape: bench/RESULTS.md "GPU, second loan");
# the cache key records any choice other than "highest".
PRECISIONS = {"highest": jax.lax.Precision.HIGHEST, "high": jax.lax.Precision.HIGH,
              "default": jax.lax.Precision.DEFAULT}


def _precision(name: str) -> str:
    if name not in PRECISIONS:
        raise ValueError(f"statistics precision must be one of {sorted(PRECISIONS)}, got {name!r}")
    return name


CORPUS_KINDS: tuple[str, ...] = ("datasets", "files", "model", "texts")


class CorpusError(RuntimeError):
    """A statistics corpus cannot be obtained (offline, missing file, bad record)."""


# ============================================================================= one jitted step


def _step_body(cfg: ModelConfig, layers: tuple[int, ...], precision: str, params: Params, tokens: Array,
               mask: Array) -> Array:
    out = forward(cfg, params, tokens, mask, taps=layers, stop_layer=max(layers) + 1)
    keys = out.keys.astype(jnp.float32)  # (m, B, T, d_k)
    keys = jnp.where(mask[None, :, :, None], keys, 0.0)  # padding (even NaN there) never counts
    flat = keys.reshape(keys.shape[0], -1, keys.shape[-1])
    return jnp.einsum("mni,mnj->mij", flat, flat, precision=PRECISIONS[precision])


@functools.lru_cache(maxsize=64)
def _compiled_step(cfg: ModelConfig, layers: tuple[int, ...], mesh: Mesh | None, precision: str = "highest"):
    body = functools.partial(_step_body, cfg, layers, _precision(precision))
    if mesh is None:
        return jax.jit(body)
    # params keep the layout they were placed with (replicated, or the run's logical-axis rules);
    # the sums come out row-sharded over every device (sharding.stats_sharding)
    return jax.jit(body, out_shardings=stats_sharding(mesh, (len(layers), cfg.d_key, cfg.d_key)))


def second_moment_step(cfg: ModelConfig, params: Params, tokens: Array, mask: Array,
                       layers: Sequence[int], *, mesh: Mesh | None = None, precision: str = "highest") -> Array:
    """``Σ_{non-pad tokens} k kᵀ`` (m, d_k, d_k) float32 for one padded batch (docs/FORMULAS.md §4)."""
    layers = _check_layers(cfg, layers)
    return _compiled_step(cfg, layers, mesh, precision)(params, tokens, mask)


def _check_layers(cfg: ModelConfig, layers: Sequence[int]) -> tuple[int, ...]:
    layers = tuple(int(l) for l in layers)
    if not layers:
        raise ValueError("no layers given for the statistics")
    if list(layers) != sorted(set(layers)):
        raise ValueError(f"layers must be strictly increasing, got {layers}")
    if layers[0] < 0 or layers[-1] >= cfg.n_layers:
        raise ValueError(f"layers {layers} outside the model's 0..{cfg.n_layers - 1}")
    return layers


def accumulate_second_moment(
    cfg: ModelConfig,
    params: Params,
    token_batches: Iterable[Batch],
    layers: Sequence[int],
    *,
    mesh: Mesh | None = None,
    precision: str = "highest",
    share: tuple[int, int] = (0, 1),
) -> tuple[Array, int]:
    """One pass over ``token_batches`` -> ``(Σ k kᵀ (m, d_k, d_k) float32, #non-pad tokens)``.

    Each batch is ``(tokens (B, T) int, mask (B, T) bool)`` with right padding; with a mesh the
    rows are padded (empty rows) to a multiple of the device count and split over ``data``.
    ``precision`` is the matmul precision of the Σ k kᵀ einsum (``PRECISIONS``).

    ``share = (g, G)`` with G > 1 (a multi-process run, ``sharding.process_row_share``): each batch
    holds only this process group's rows (B / G of them, the same number in every process: see
    ``make_process_batches``), placed with ``jax.make_array_from_process_local_data``; the count
    returned is the total over the groups.  Every process must pass the same number of batches of
    the same shapes.
    """
    layers = _check_layers(cfg, layers)
    step = _compiled_step(cfg, layers, mesh, precision)
    n_dev = mesh_size(mesh)
    g, n_groups = share
    if n_groups > 1 and (mesh is None or n_dev % n_groups):
        raise ValueError(f"share={share}: the {n_groups} process groups must split the mesh's data axis")
    if mesh is not None and mesh_of(params) != mesh:
        params = jax.tree.map(lambda x: put_global(x, replicated(mesh)), params)
    total = None
    count = 0
    for i, (tokens, mask) in enumerate(token_batches):
        tokens, mask = np.asarray(tokens, np.int32), np.asarray(mask, bool)
        if tokens.ndim != 2 or tokens.shape != mask.shape:
            raise ValueError(f"batch {i}: tokens {tokens.shape} and mask {mask.shape} must both be (B, T)")
        count += int(mask.sum())
        if n_groups > 1:
            k = n_dev // n_groups  # data devices of one group
            tokens, mask = pad_to_multiple(tokens, k), pad_to_multiple(mask, k)
            n_rows = tokens.shape[0] * n_groups
            tokens, mask = put_process_rows(tokens, mesh, n_rows), put_process_rows(mask, mesh, n_rows)
        elif n_dev > 1:
            tokens, mask = pad_to_multiple(tokens, n_dev), pad_to_multiple(mask, n_dev)
            rows = batch_sharding(mesh, 2)
            tokens, mask = put_global(tokens, rows), put_global(mask, rows)
        s = step(params, tokens, mask)
        total = s if total is None else total + s
    if n_groups > 1:
        count = _groups_total(g, count)
    if total is None:
        raise CorpusError("no batches: the statistics corpus is empty")
    return total, count


def _groups_total(group: int, value: int) -> int:
    """Σ over process groups of ``value`` (the processes of one group hold the same value)."""
    from jax.experimental import multihost_utils

    both = np.asarray(multihost_utils.process_allgather(np.asarray([group, value], np.int64)))
    return int(sum(dict(both.reshape(-1, 2).tolist()).values()))


def _allgather_rows(x: np.ndarray) -> np.ndarray:
    """(n_processes, *x.shape): every process's ``x`` (just ``x[None]`` in a single-process run)."""
    if jax.process_count() == 1:
        return np.asarray(x)[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x)[None], tiled=True))


# ============================================================================= bucketing


def _round_rows(n: int, cap: int, multiple: int) -> int:
    p = 1 << max(n - 1, 0).bit_length()
    p = ((p + multiple - 1) // multiple) * multiple
    return min(p, cap)


def _length_buckets(token_lists: Sequence[Sequence[int]], min_len: int, max_len: int) -> dict[int, list[int]]:
    """Document indices per length bucket T (``bucket_length``); empty documents skipped.  Raises ValueError
    naming a document longer than ``max_len``."""
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(token_lists):
        n = len(ids)
        if n == 0:
            continue
        if n > max_len:
            raise ValueError(f"document {i} has {n} tokens > max_len={max_len} (tokenize with truncation)")
        groups.setdefault(bucket_length(n, min_len=min_len, max_len=max_len, pow2_until=max_len), []).append(i)
    return groups


def make_batches(
    token_lists: Sequence[Sequence[int]],
    *,
    max_len: int,
    token_budget: int = 8192,
    min_len: int = 16,
    multiple: int = 1,
    pad_id: int = 0,
) -> list[Batch]:
    """Length-bucketed, right-padded batches (see module doc). Empty documents are skipped."""
    if max_len < 1 or token_budget < 1 or multiple < 1:
        raise ValueError("max_len, token_budget and multiple must be >= 1")
    groups = _length_buckets(token_lists, min_len, max_len)
    batches: list[Batch] = []
    for T in sorted(groups):
        idx = sorted(groups[T], key=lambda i: (-len(token_lists[i]), i))
        cap = max(multiple, (max(1, token_budget // T) // multiple) * multiple)
        for s in range(0, len(idx), cap):
            chunk = idx[s:s + cap]
            batches.append(_filled(token_lists, chunk, _round_rows(len(chunk), cap, multiple), T, pad_id))
    return batches


def _filled(token_lists: Sequence[Sequence[int]], chunk: Sequence[int], B: int, T: int, pad_id: int) -> Batch:
    """(tokens (B, T) int32, mask (B, T) bool): documents ``chunk`` right-padded, then empty rows."""
    tokens = np.full((B, T), pad_id, np.int32)
    mask = np.zeros((B, T), bool)
    for r, i in enumerate(chunk):
        ids = token_lists[i]
        tokens[r, :len(ids)] = ids
        mask[r, :len(ids)] = True
    return tokens, mask


def make_process_batches(
    token_lists: Sequence[Sequence[int]],
    n_groups: int,
    *,
    max_len: int,
    token_budget: int = 8192,
    min_len: int = 16,
    multiple: int = 1,
    pad_id: int = 0,
) -> list[Batch]:
    """This process group's part of the statistics batches of a multi-process run.

    ``token_lists`` are the documents of this group (its contiguous slice of the corpus); the
    groups agree (one all-gather of per-bucket document counts) on the batches: for each length
    bucket T, as many batches as the fullest group needs, each of ``B_T / n_groups`` rows, where
    ``B_T`` follows ``make_batches`` with ``multiple`` = the mesh's data axis; a group with fewer
    documents fills the rest with empty rows (they never count).  So every process feeds the same
    jitted steps with the same global shapes, and the sums over all groups are those of the whole
    corpus (up to float summation order)."""
    if max_len < 1 or token_budget < 1 or multiple < 1 or multiple % n_groups:
        raise ValueError(f"max_len, token_budget and multiple must be >= 1 and multiple ({multiple}) a "
                         f"multiple of the {n_groups} process groups")
    widths = sorted({bucket_length(n, min_len=min_len, max_len=max_len, pow2_until=max_len)
                     for n in range(1, max_len + 1)})
    groups = {T: [] for T in widths} | _length_buckets(token_lists, min_len, max_len)
    most = _allgather_rows(np.asarray([len(groups[T]) for T in widths], np.int64)).max(axis=0)
    local_multiple = multiple // n_groups
    batches: list[Batch] = []
    for T, m in zip(widths, most.tolist()):
        idx = sorted(groups[T], key=lambda i: (-len(token_lists[i]), i))
        cap = max(multiple, (max(1, token_budget // T) // multiple) * multiple) // n_groups
        for s in range(0, m, cap):
            chunk = idx[s:s + cap]
            batches.append(_filled(token_lists, chunk, _round_rows(min(cap, m - s), cap, local_multiple), T, pad_id))
    return batches


def tokenize_corpus(tokenizer: Any, texts: Sequence[str], max_len: int, *,
                    chunk: int = 1000) -> list[list[int]]:
    """``tokenizer(text, truncation=True, max_length=max_len)["input_ids"]`` for every document
    (BOS as the tokenizer adds it; docs/FORMULAS.md §R3)."""
    out: list[list[int]] = []
    for s in range(0, len(texts), chunk):
        part = list(texts[s:s + chunk])
        ids = tokenizer(part, truncation=True, max_length=max_len)["input_ids"]
        out.extend(list(map(int, x)) for x in ids)
    return out


# ============================================================================= corpora


SEED_PROMPTS: tuple[str, ...] = (
    "The", "In", "A", "It", "This", "When", "According to", "Many", "After", "During", "Although",
    "Scientists", "The history of", "In the city of", "The company", "Researchers have",
    "The river", "His", "Her", "The first", "On", "There is", "One of the", "The government",
    "Most people", "The album", "The village", "In 1990,", "The team", "Some", "Because", "You",
)


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """Where the statistics documents come from.

    kind="datasets": HF ``load_dataset(name, config, split=split)``, first n of a seed-``seed``
      shuffle of the indices (reference: wikipedia/20200501.en, seed 1);
    kind="files":    ``paths`` (.txt / .jsonl), see :func:`corpus_from_files`;
    kind="model":    texts sampled from the model itself (:func:`corpus_from_model`);
    kind="texts":    the given ``texts`` (tests, callers with their own corpus).
    ``label`` overrides the corpus id used in cache keys.
    """

    kind: str = "datasets"
    name: str = "wikipedia"
    config: str | None = "20200501.en"
    split: str = "train"
    paths: tuple[str, ...] = ()
    texts: tuple[str, ...] = ()
    seed: int = 1
    txt_mode: str = "paragraph"
    text_field: str = "text"
    top_k: int = 5
    label: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in CORPUS_KINDS:
            raise ValueError(f"unknown corpus kind {self.kind!r}")


def _offline() -> bool:
    truthy = {"1", "true", "yes", "on"}
    env = any(os.environ.get(v, "").strip().lower() in truthy
              for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    try:
        import datasets.config as dc
        env = env or bool(getattr(dc, "HF_HUB_OFFLINE", False)) or bool(getattr(dc, "HF_DATASETS_OFFLINE", False))
    except Exception:  # pragma: no cover - datasets missing
        pass
    return env


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def part_bounds(n: int, part: tuple[int, int]) -> tuple[int, int]:
    """``[lo, hi)`` of part ``g`` of ``n_parts`` contiguous, near-equal slices of ``n`` documents.

    Raises ValueError unless 0 ≤ g < n_parts."""
    g, n_parts = part
    if not 0 <= g < n_parts:
        raise ValueError(f"corpus part {g} of {n_parts}: need 0 <= part < parts")
    bounds = np.linspace(0, n, n_parts + 1).astype(int)
    return int(bounds[g]), int(bounds[g + 1])


def corpus_from_datasets(name: str, config: str | None, split: str, n: int, *, seed: int = 1,
                         text_field: str = "text", part: tuple[int, int] = (0, 1)) -> list[str]:
    """``n`` documents of an HF dataset: the first ``n`` indices of ``random.Random(seed)``'s
    shuffle of ``range(len(ds))`` (reference ``FixedRandomSubsetSampler``, docs/FORMULAS.md §R3).
    ``part = (g, n_parts)`` materializes only slice ``g`` of those documents (``part_bounds``): a
    process of a multi-process run reads only the texts it feeds (the dataset itself is memory-mapped).

    Fails at once with :class:`CorpusError` when offline (``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE``
    set and the dataset not in the local cache, or huggingface.co unreachable within 3 s).
    """
    what = f"dataset {name!r} config={config!r} split={split!r}"
    offline = _offline()
    if not offline and not _hub_reachable():
        raise CorpusError(
            f"{what}: huggingface.co is unreachable (offline?). If the dataset is in the local HF "
            "cache set HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1; otherwise use a files corpus "
            "(corpus_from_files) or a model-sampled corpus (corpus_from_model)")
    try:
        import datasets
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        hint = " (offline mode: only the local HF cache is searched)" if offline else ""
        raise CorpusError(f"{what} could not be loaded{hint}: {type(e).__name__}: {e}") from e
    if text_field not in ds.column_names:
        raise CorpusError(f"{what} has no {text_field!r} column (columns: {ds.column_names})")
    idx = list(range(len(ds)))
    random.Random(seed).shuffle(idx)
    idx = idx[:n]
    lo, hi = part_bounds(len(idx), part)
    sub = ds.select(idx[lo:hi])
    return [str(t) for t in sub[text_field]]


def corpus_from_files(paths: Sequence[str | os.PathLike], *, txt_mode: str = "paragraph") -> list[str]:
    """Documents from local files, in the given order.

    * ``.txt``: ``txt_mode="paragraph"`` (default) — one document per paragraph, paragraphs
      separated by one or more blank lines (lines inside a paragraph keep their newlines);
      ``txt_mode="line"`` — one document per non-blank line.  Surrounding whitespace is stripped.
    * ``.jsonl``: one JSON object per non-blank line with a string field ``"text"``.
    """
    if txt_mode not in ("paragraph", "line"):
        raise ValueError(f"txt_mode must be 'paragraph' or 'line', got {txt_mode!r}")
    docs: list[str] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise CorpusError(f"statistics corpus file not found: {p}")
        suffix = p.suffix.lower()
        if suffix == ".txt":
            text = p.read_text(encoding="utf-8")
            parts = re.split(r"\n[ \t\r\f\v]*\n", text) if txt_mode == "paragraph" else text.splitlines()
            docs.extend(s.strip() for s in parts if s.strip())
        elif suffix == ".jsonl":
            with p.open(encoding="utf-8") as f:
                for ln, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise CorpusError(f"{p}:{ln}: invalid JSON ({e.msg})") from e
                    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                        raise CorpusError(f"{p}:{ln}: expected an object with a string field 'text'")
                    docs.append(rec["text"])
        else:
            raise CorpusError(f"{p}: unsupported corpus file type {suffix!r} (use .txt or .jsonl)")
    return docs


def corpus_from_model(cfg: ModelConfig, params: Params, tokenizer: Any, n_docs: int, max_len: int,
                      seed: int = 0, *, top_k: int = 5,
                      prompts: Sequence[str] = SEED_PROMPTS) -> list[str]:
    """``n_docs`` texts of ``max_len`` total tokens sampled (top-k) from the model itself, starting
    from the short seed ``prompts`` in turn; row ``i`` samples with its own key (``models.generate``)."""
    from models.generate import sample_texts  # lazy: generation is not needed otherwise

    if n_docs < 1:
        return []
    seeds = [prompts[i % len(prompts)] for i in range(n_docs)]
    return list(sample_texts(cfg, params, tokenizer, seeds, max_out_len=max_len, top_k=top_k, seed=seed))


def _hash_files(paths: Sequence[str | os.PathLike]) -> str:
    h = hashlib.sha1()
    for p in map(Path, paths):
        if not p.is_file():
            raise CorpusError(f"statistics corpus file not found: {p}")
        h.update(p.name.encode() + b"\0")
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:12]


def corpus_id(spec: CorpusSpec, *, max_len: int | None = None) -> str:
    """A stable id of the corpus for cache keys (``spec.label`` when given)."""
    if spec.label:
        return spec.label
    if spec.kind == "datasets":
        return f"{spec.name}-{spec.config or 'default'}-{spec.split}-seed{spec.seed}"
    if spec.kind == "files":
        return f"files-{spec.txt_mode}-{_hash_files(spec.paths)}"
    if spec.kind == "model":
        return f"model-sampled-seed{spec.seed}-topk{spec.top_k}-len{max_len}"
    h = hashlib.sha1("\0".join(spec.texts).encode()).hexdigest()[:12]
    return f"texts-{h}"


def load_corpus(spec: CorpusSpec, n: int, *, cfg: ModelConfig | None = None, params: Params | None = None,
                tokenizer: Any = None, max_len: int | None = None, part: tuple[int, int] = (0, 1)) -> list[str]:
    """The first ``n`` documents of ``spec`` (model-sampled corpora need cfg/params/tokenizer/max_len), or
    with ``part = (g, n_parts)`` only slice ``g`` of them (``part_bounds`` of the documents there are, at
    most ``n``): an HF dataset then materializes only that slice; a model-sampled corpus is generated
    whole by every process (generation is one collective computation on the mesh) and then sliced."""
    if spec.kind == "datasets":
        return corpus_from_datasets(spec.name, spec.config, spec.split, n, seed=spec.seed,
                                    text_field=spec.text_field, part=part)
    if spec.kind == "files":
        texts = corpus_from_files(spec.paths, txt_mode=spec.txt_mode)[:n]
    elif spec.kind == "model":
        if cfg is None or params is None or tokenizer is None or max_len is None:
            raise ValueError("a model-sampled corpus needs cfg, params, tokenizer and max_len")
        texts = corpus_from_model(cfg, params, tokenizer, n, max_len, spec.seed, top_k=spec.top_k)
    else:
        texts = list(spec.texts[:n])
    lo, hi = part_bounds(len(texts), part)
    return texts[lo:hi]


# ============================================================================= cache


def stats_key(model_id: str, layer: int, corpus: str, n_samples: int, max_len: int,
              dtype: str = STATS_DTYPE, precision: str = "highest") -> dict[str, Any]:
    """The cache key stored inside each per-layer file (``precision`` only when not "highest")."""
    key = {"model_id": str(model_id), "layer": int(layer), "corpus_id": str(corpus),
           "n_samples": int(n_samples), "max_len": int(max_len), "dtype": str(dtype)}
    if _precision(precision) != "highest":
        key["precision"] = precision
    return key


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "_"


def stats_path(cache_dir: str | os.PathLike, key: dict[str, Any]) -> Path:
    """``{cache_dir}/{model_id}/{corpus_id}/layer{l}_{dtype}_mom2_n{n_samples}_len{max_len}.npz``."""
    prec = f"_{key['precision']}" if "precision" in key else ""
    return (Path(cache_dir) / _safe(key["model_id"]) / _safe(key["corpus_id"])
            / f"layer{key['layer']}_{key['dtype']}{prec}_mom2_n{key['n_samples']}_len{key['max_len']}.npz")


def load_layer_stats(path: str | os.PathLike, key: dict[str, Any] | None = None
                     ) -> tuple[np.ndarray, int, dict[str, Any]]:
    """Read one cache file -> (float32 SUM (d_k, d_k), token count, stored key); with ``key``,
    raise ``ValueError`` naming the file and field when the stored key differs."""
    with np.load(path, allow_pickle=False) as z:
        mom2, count = np.asarray(z["mom2_sum"]), int(z["count"])
        stored = {k: z[f"key_{k}"].item() for k in ("model_id", "layer", "corpus_id", "n_samples",
                                                      "max_len", "dtype")}
    if key is not None:
        for k, v in key.items():
            if stored.get(k) != v:
                raise ValueError(f"statistics cache {path}: stored {k}={stored.get(k)!r}, expected {v!r}; "
                                 "delete the file or fix the cache key")
    if mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1] or count <= 0:
        raise ValueError(f"statistics cache {path}: malformed (mom2_sum {mom2.shape}, count {count})")
    return mom2, count, stored


def _save_layer_stats(path: Path, mom2: np.ndarray, count: int, key: dict[str, Any]) -> None:
    if not np.isfinite(mom2).all():
        raise ValueError(f"layer {key['layer']}: non-finite second-moment sum; not writing {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, mom2_sum=mom2.astype(np.float32), count=np.int64(count),
                 **{f"key_{k}": np.asarray(v) for k, v in key.items()})
    os.replace(tmp, path)


def _normalize(mom2: np.ndarray, count: int) -> np.ndarray:
    """C0 = SUM / count (float32), the same arithmetic on a fresh pass and on a cache hit."""
    return (mom2.astype(np.float64) / float(count)).astype(np.float32)


def layer_stats(
    cfg: ModelConfig,
    params: Params,
    tokenizer: Any,
    layers: Sequence[int],
    corpus_spec: CorpusSpec,
    *,
    n_samples: int,
    max_len: int,
    cache_dir: str | os.PathLike,
    model_id: str,
    compute: bool = True,
    token_budget: int = 8192,
    mesh: Mesh | None = None,
    dtype: str = STATS_DTYPE,
    precision: str = "highest",
) -> Array:
    """Normalized ``C0 = E[k kᵀ]`` (m, d_k, d_k) float32 for ``layers`` (docs/FORMULAS.md §4), cached.

    Layers already cached are read back (key verified); all missing layers are computed in ONE
    pass over ``n_samples`` documents of ``corpus_spec`` truncated to ``max_len`` tokens and written
    (one npz per layer, atomically).  ``compute=False`` with a missing layer raises
    :class:`StatsMissingError` naming the layer and the file.  Logs a warning when a layer's
    statistics come from fewer tokens than d_k (C0 rank-deficient).
    """
    layers = _check_layers(cfg, layers)
    if dtype != STATS_DTYPE:
        raise ValueError(f"only {STATS_DTYPE} statistics are supported, got {dtype!r}")
    cid = corpus_id(corpus_spec, max_len=max_len)
    keys = {l: stats_key(model_id, l, cid, n_samples, max_len, dtype, precision) for l in layers}
    paths = {l: stats_path(cache_dir, keys[l]) for l in layers}
    have: dict[int, tuple[np.ndarray, int]] = {}
    for l in layers:
        if paths[l].is_file():
            mom2, count, _ = load_layer_stats(paths[l], keys[l])
            if mom2.shape != (cfg.d_key, cfg.d_key):
                raise ValueError(f"statistics cache {paths[l]}: shape {mom2.shape} != d_k {cfg.d_key}")
            have[l] = (mom2, count)
    # every process computes what any of them lacks (the pass is a collective computation)
    lacks = _allgather_rows(np.asarray([l not in have for l in layers], np.int32)).any(axis=0)
    missing = tuple(l for l, lack in zip(layers, lacks.tolist()) if lack)
    if missing and not compute:
        raise StatsMissingError(
            "layer statistics missing for "
            + ", ".join(f"layer {l} ({paths[l]})" for l in missing)
            + "; call layer_stats with compute=True to build them")
    if missing:
        log.info("computing E[kk^T] for layers %s over %d docs of %s", missing, n_samples, cid)
        share = (0, 1) if mesh is None else process_row_share(mesh) or (0, 1)
        # multi-process: each process group reads, tokenizes and feeds only its slice of the documents
        texts = load_corpus(corpus_spec, n_samples, cfg=cfg, params=params, tokenizer=tokenizer,
                            max_len=max_len, part=share)
        n_docs = _groups_total(share[0], len(texts)) if share[1] > 1 else len(texts)
        if n_docs < n_samples:
            log.warning("statistics corpus %s has only %d of the %d requested documents",
                        cid, n_docs, n_samples)
        if share[1] > 1:
            g, n_groups = share
            lo, hi = part_bounds(n_samples, share)
            log.info("statistics: process group %d of %d feeds %d documents (slice [%d, %d) of %d requested)",
                     g, n_groups, len(texts), lo, hi, n_samples)
            token_lists = tokenize_corpus(tokenizer, texts, max_len)
            batches = make_process_batches(token_lists, n_groups, max_len=max_len, token_budget=token_budget,
                                           multiple=mesh_size(mesh))
        else:
            token_lists = tokenize_corpus(tokenizer, texts, max_len)
            batches = make_batches(token_lists, max_len=max_len, token_budget=token_budget,
                                   multiple=mesh_size(mesh))
        sums, count = accumulate_second_moment(cfg, params, batches, missing, mesh=mesh, precision=precision,
                                               share=share)
        sums = to_host(sums)
        if count <= 0:
            raise CorpusError(f"statistics corpus {cid} has no tokens")
        for j, l in enumerate(missing):
            _save_layer_stats(paths[l], sums[j], count, keys[l])
            have[l] = (sums[j], count)
    few = {l: have[l][1] for l in layers if have[l][1] < cfg.d_key}
    if few:
        log.warning(
            "layer statistics of layers %s come from %s token(s), fewer than d_k = %d: C0 = E[kk^T] is "
            "rank-deficient, so MEMIT's λ·C0 leaves directions unconstrained (large increments) and "
            "AlphaEdit's null space is mostly noise; raise stats.n_samples / stats.max_len "
            "(the reference uses 100k documents)", sorted(few), sorted(set(few.values())), cfg.d_key)
    C0 = np.stack([_normalize(*have[l]) for l in layers])
    chex.assert_shape(C0, (len(layers), cfg.d_key, cfg.d_key))
    return jnp.asarray(C0)
