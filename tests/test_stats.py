"""Layer statistics C0 = E[k kᵀ] (docs/FORMULAS.md §4, §R3) against torch per-sequence keys."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from metake_jax import stats as S
from metake_jax.errors import StatsMissingError

ROOT = Path(__file__).resolve().parents[1]
from tests.tiny import tiny_hf_model, tiny_tokenizer, to_jax

LAYERS = (1, 2)
MAX_LEN = 64
BUDGET = 128
LENGTHS = [3, 9, 17, 16, 31, 33, 40, 5, 1, 25, 12, 64]


@pytest.fixture(scope="module")
def model():
    m = tiny_hf_model("llama", seed=0)
    cfg, params = to_jax(m)
    return m, cfg, params


@pytest.fixture(scope="module")
def docs():
    rng = np.random.default_rng(0)
    return [rng.integers(3, 320, size=n).tolist() for n in LENGTHS]


def torch_second_moment(m, token_lists, layers):
    """Oracle: float64 Σ k kᵀ from torch keys, one unpadded sequence at a time (pre-hook on down_proj)."""
    import torch

    caps: dict[int, list[np.ndarray]] = {l: [] for l in layers}
    hooks = [m.model.layers[l].mlp.down_proj.register_forward_pre_hook(
        lambda mod, inp, l=l: caps[l].append(inp[0][0].double().numpy())) for l in layers]
    try:
        with torch.no_grad():
            for ids in token_lists:
                if ids:
                    m(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return np.stack([sum(k.T @ k for k in caps[l]) for l in layers])


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# ----------------------------------------------------------------------------- one pass


def test_one_pass_matches_torch_per_sequence(model, docs):
    m, cfg, params = model
    batches = S.make_batches(docs, max_len=MAX_LEN, token_budget=BUDGET)
    assert len({b[0].shape for b in batches}) > 2  # several buckets, mixed lengths inside them
    sums, count = S.accumulate_second_moment(cfg, params, batches, LAYERS)
    assert sums.shape == (2, cfg.d_key, cfg.d_key) and sums.dtype == np.float32
    assert count == sum(LENGTHS)
    want = torch_second_moment(m, docs, LAYERS)
    assert rel(sums[0], want[0]) <= 1e-5 and rel(sums[1], want[1]) <= 1e-5
    assert rel(want[0], want[1]) > 0.1  # the two layers really differ


def test_padding_content_is_ignored(model, docs):
    _, cfg, params = model
    a, ca = S.accumulate_second_moment(
        cfg, params, S.make_batches(docs, max_len=MAX_LEN, token_budget=BUDGET), LAYERS)
    b, cb = S.accumulate_second_moment(
        cfg, params, S.make_batches(docs, max_len=MAX_LEN, token_budget=BUDGET, pad_id=311), LAYERS)
    assert ca == cb
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_make_batches_buckets():
    token_lists = [list(range(1, n + 1)) for n in [1, 2, 15, 16, 17, 100, 128, 0, 5]]
    batches = S.make_batches(token_lists, max_len=128, token_budget=64, multiple=2)
    seen = []
    for tokens, mask in batches:
        B, T = tokens.shape
        assert T in (16, 32, 64, 128) and B % 2 == 0
        assert B * T <= max(64, 2 * T)
        assert not mask[:, 1:][~mask[:, :-1]].any()  # right padding
        for r in range(B):
            n = int(mask[r].sum())
            if n:
                seen.append(n)
                assert tokens[r, :n].tolist() == list(range(1, n + 1))
    assert sorted(seen) == sorted(n for n in [1, 2, 15, 16, 17, 100, 128, 5])  # empty doc skipped
    with pytest.raises(ValueError, match="document 0 has 200 tokens"):
        S.make_batches([[1] * 200], max_len=128)


def test_process_batches_split_the_corpus(model, docs, monkeypatch):
    """A 2-process run: each process group batches its contiguous half of the documents; the groups'
    batches have the same shapes, batch k of the run is their rows stacked, and the Σ k kᵀ over those
    global batches is the torch per-sequence oracle of the whole corpus (the all-gather of the
    per-bucket counts is emulated with both groups' counts)."""
    m, cfg, params = model
    halves = [docs[:len(docs) // 2], docs[len(docs) // 2:]]
    counts = []
    monkeypatch.setattr(S, "_allgather_rows", lambda x: (counts.append(x), x[None])[1])
    for h in halves:
        S.make_process_batches(h, 2, max_len=MAX_LEN, token_budget=BUDGET, multiple=4)
    monkeypatch.setattr(S, "_allgather_rows", lambda x: np.stack(counts))
    parts = [S.make_process_batches(h, 2, max_len=MAX_LEN, token_budget=BUDGET, multiple=4) for h in halves]
    assert len(parts[0]) == len(parts[1]) > 2
    glob = []
    for (t0, m0), (t1, m1) in zip(*parts):
        assert t0.shape == t1.shape and t0.shape[0] % 2 == 0  # rows per group: a multiple of 4 / 2 devices
        glob.append((np.concatenate([t0, t1]), np.concatenate([m0, m1])))
    sums, count = S.accumulate_second_moment(cfg, params, glob, LAYERS)
    assert count == sum(LENGTHS)
    want = torch_second_moment(m, docs, LAYERS)
    assert rel(sums[0], want[0]) <= 1e-5 and rel(sums[1], want[1]) <= 1e-5


def test_bucket_length_one_rule():
    """The one bucketing rule (models.generate.bucket_length) gives both callers' widths: the smallest
    allowed width >= n, by brute force over the allowed sets."""
    from models.generate import bucket_length

    prompts = [2 ** k for k in range(3, 9)] + list(range(384, 2049, 128))  # generate: 8..256, then 128 steps
    docs = [16, 32, 64, 96]  # make_batches with min_len=16, max_len=96: powers of two, capped at max_len
    for n in range(1, 1025):
        assert bucket_length(n) == min(w for w in prompts if w >= n), n
        if n <= 96:
            assert bucket_length(n, min_len=16, max_len=96, pow2_until=96) == min(w for w in docs if w >= n), n


# ----------------------------------------------------------------------------- 8 devices


_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    from models.config import ModelConfig
    from metake_jax import stats as S
    from metake_jax.sharding import make_mesh
    z = np.load(sys.argv[1])
    cfg = ModelConfig.from_dict(json.loads(str(z["cfg"])))
    params = {}
    for name in z.files:
        if name.startswith("p/"):
            node = params
            *path, leaf = name[2:].split("/")
            for p in path:
                node = node.setdefault(p, {})
            node[leaf] = z[name]
    docs = json.loads(str(z["docs"]))
    mesh = make_mesh()
    # batches whose row counts are NOT multiples of 8: accumulate pads them with empty rows
    batches = S.make_batches(docs, max_len=64, token_budget=128)
    sums, count = S.accumulate_second_moment(cfg, params, batches, (1, 2), mesh=mesh)
    np.savez(sys.argv[2], sums=np.asarray(sums), count=count)
    print(json.dumps({"devices": jax.device_count(), "n_shards": len(sums.sharding.device_set)}))
""")


def _flatten(tree, prefix="p"):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}/{k}"))
        else:
            out[f"{prefix}/{k}"] = np.asarray(v)
    return out


def test_eight_devices_equal_one_device(model, docs, tmp_path):
    _, cfg, params = model
    np.savez(tmp_path / "in.npz", cfg=json.dumps(cfg.to_dict()), docs=json.dumps(docs), **_flatten(params))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                         env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info == {"devices": 8, "n_shards": 8}
    got = np.load(tmp_path / "out.npz")
    one, count = S.accumulate_second_moment(
        cfg, params, S.make_batches(docs, max_len=MAX_LEN, token_budget=BUDGET), LAYERS)
    assert int(got["count"]) == count
    assert rel(got["sums"], one) <= 1e-5


# ----------------------------------------------------------------------------- layer_stats + cache


TEXTS = tuple(
    "The capital of France is Paris and the river is the Seine." * (i % 3 + 1) + f" Line {i}."
    for i in range(6)
) + ("Danielle Darrieux speaks French.", "Apple was founded by Steve Jobs in California.")


def test_layer_stats_cache(model, tmp_path):
    m, cfg, params = model
    tok = tiny_tokenizer(add_bos=True)
    spec = S.CorpusSpec(kind="texts", texts=TEXTS)
    kw = dict(n_samples=len(TEXTS), max_len=MAX_LEN, cache_dir=tmp_path, model_id="tiny/llama")
    C0 = np.asarray(S.layer_stats(cfg, params, tok, LAYERS, spec, token_budget=BUDGET, **kw))
    # oracle: torch keys of the truncated, BOS-prefixed documents, normalized by the token count
    ids = [tok(t, truncation=True, max_length=MAX_LEN)["input_ids"] for t in TEXTS]
    assert all(x[0] == tok.bos_token_id for x in ids) and max(map(len, ids)) == MAX_LEN
    want = torch_second_moment(m, ids, LAYERS) / sum(map(len, ids))
    assert C0.shape == (2, cfg.d_key, cfg.d_key) and C0.dtype == np.float32
    assert rel(C0[0], want[0]) <= 1e-5 and rel(C0[1], want[1]) <= 1e-5
    files = sorted(p.name for p in tmp_path.rglob("*.npz"))
    assert files == [f"layer{l}_float32_mom2_n{len(TEXTS)}_len{MAX_LEN}.npz" for l in LAYERS]
    mom2, count, key = S.load_layer_stats(next(tmp_path.rglob("layer2_*.npz")))
    assert count == sum(map(len, ids)) and key["layer"] == 2 and key["model_id"] == "tiny/llama"
    # cache hit: identical arrays, nothing recomputed (compute=False would raise otherwise)
    again = np.asarray(S.layer_stats(cfg, params, tok, LAYERS, spec, compute=False, **kw))
    np.testing.assert_array_equal(again, C0)
    one = np.asarray(S.layer_stats(cfg, params, tok, (2,), spec, compute=False, **kw))
    np.testing.assert_array_equal(one[0], C0[1])
    # missing statistics: named layer and file
    with pytest.raises(StatsMissingError, match=r"layer 0 \(.*layer0_float32_mom2_n8_len64\.npz\)"):
        S.layer_stats(cfg, params, tok, (0, 1), spec, compute=False, **kw)
    other = S.CorpusSpec(kind="texts", texts=TEXTS[:-1])
    with pytest.raises(StatsMissingError, match="layer 1"):
        S.layer_stats(cfg, params, tok, LAYERS, other, compute=False, **kw)
    # a file whose stored key disagrees with its name is refused
    path = next(tmp_path.rglob("layer1_*.npz"))
    z = dict(np.load(path))
    z["key_n_samples"] = np.asarray(99)
    np.savez(path, **z)
    with pytest.raises(ValueError, match="n_samples=99"):
        S.layer_stats(cfg, params, tok, LAYERS, spec, compute=False, **kw)


def test_precision_option(model, docs, tmp_path):
    """Each Σ k kᵀ precision matches the torch float64 oracle; only non-"highest" choices get their own file."""
    m, cfg, params = model
    batches = S.make_batches(docs, max_len=MAX_LEN, token_budget=BUDGET)
    want = torch_second_moment(m, docs, LAYERS)
    for prec in ("default", "high"):
        sums, _ = S.accumulate_second_moment(cfg, params, batches, LAYERS, precision=prec)
        assert rel(sums[0], want[0]) <= 1e-2 and rel(sums[1], want[1]) <= 1e-2  # TF32-level on a GPU
    with pytest.raises(ValueError, match="statistics precision must be one of"):
        S.accumulate_second_moment(cfg, params, batches, LAYERS, precision="tf32")
    hi, lo = S.stats_key("m", 1, "c", 8, 64), S.stats_key("m", 1, "c", 8, 64, precision="default")
    assert "precision" not in hi and lo["precision"] == "default"
    assert S.stats_path(tmp_path, hi).name == "layer1_float32_mom2_n8_len64.npz"
    assert S.stats_path(tmp_path, lo).name == "layer1_float32_default_mom2_n8_len64.npz"


# ----------------------------------------------------------------------------- corpora


def test_datasets_offline_fails_fast(monkeypatch):
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"  # tests/conftest.py
    with pytest.raises(S.CorpusError, match="could not be loaded.*offline"):
        S.corpus_from_datasets("wikipedia", "20200501.en", "train", 5)
    monkeypatch.setattr(S, "_offline", lambda: False)
    monkeypatch.setattr(S, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(S.CorpusError, match="unreachable"):
        S.corpus_from_datasets("wikipedia", "20200501.en", "train", 5)


def test_corpus_from_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("First para line one.\nline two.\n\n  \nSecond para.\n\n\nThird.\n", encoding="utf-8")
    assert S.corpus_from_files([txt]) == ["First para line one.\nline two.", "Second para.", "Third."]
    assert S.corpus_from_files([txt], txt_mode="line") == [
        "First para line one.", "line two.", "Second para.", "Third."]
    jl = tmp_path / "b.jsonl"
    jl.write_text('{"text": "doc one"}\n\n{"text": "doc two", "id": 3}\n', encoding="utf-8")
    assert S.corpus_from_files([jl, txt])[:3] == ["doc one", "doc two", "First para line one.\nline two."]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"title": "no text"}\n', encoding="utf-8")
    with pytest.raises(S.CorpusError, match=r"bad\.jsonl:2"):
        S.corpus_from_files([bad])
    with pytest.raises(S.CorpusError, match="not found"):
        S.corpus_from_files([tmp_path / "nope.txt"])
    with pytest.raises(S.CorpusError, match="unsupported"):
        (tmp_path / "c.csv").write_text("x")
        S.corpus_from_files([tmp_path / "c.csv"])
    # the files corpus id follows the content
    a = S.corpus_id(S.CorpusSpec(kind="files", paths=(str(txt),)))
    txt.write_text("changed\n", encoding="utf-8")
    assert S.corpus_id(S.CorpusSpec(kind="files", paths=(str(txt),))) != a


@pytest.mark.parametrize("n_parts", [2, 3])
def test_corpus_parts_are_slices_of_the_whole(tmp_path, monkeypatch, n_parts):
    """``load_corpus(part=(g, n))``: the parts of every corpus kind, concatenated in order, are the whole
    corpus (each document once); an HF dataset (a local ``datasets.Dataset`` standing in for the hub)
    materializes only its slice of the seeded shuffle; a part outside the range is refused."""
    import datasets

    docs = [f"document number {i}" for i in range(11)]
    ds = datasets.Dataset.from_dict({"text": docs})
    selected = []
    real_select = datasets.Dataset.select
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: ds)
    monkeypatch.setattr(datasets.Dataset, "select",
                        lambda self, idx, *a, **k: (selected.append(list(idx)), real_select(self, idx, *a, **k))[1])
    monkeypatch.setattr(S, "_offline", lambda: True)
    (tmp_path / "c.txt").write_text("\n\n".join(docs), encoding="utf-8")
    specs = [S.CorpusSpec(kind="datasets", name="local"), S.CorpusSpec(kind="texts", texts=tuple(docs)),
             S.CorpusSpec(kind="files", paths=(str(tmp_path / "c.txt"),))]
    for spec in specs:
        whole = S.load_corpus(spec, 9)
        assert len(whole) == 9 and len(set(whole)) == 9
        parts = [S.load_corpus(spec, 9, part=(g, n_parts)) for g in range(n_parts)]
        assert sum(parts, []) == whole
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert [len(i) for i in selected] == [9] + [len(p) for p in parts]  # the dataset's reads: whole, then slices
    with pytest.raises(ValueError, match="corpus part 2 of 2"):
        S.load_corpus(specs[1], 9, part=(2, 2))


def test_corpus_from_model(model):
    _, cfg, params = model
    tok = tiny_tokenizer(add_bos=False)
    texts = S.corpus_from_model(cfg, params, tok, 3, 12, seed=0)
    assert len(texts) == 3
    for t, p in zip(texts, S.SEED_PROMPTS):
        assert t.startswith(p) and len(t) > len(p)
