"""Analyses (docs/FORMULAS.md §10) and paired statistics (§11): metake_jax/analysis.py, report.paired_*,
launch/compare.py.  Fast: a tiny random model and synthetic per-case outcomes."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metake_jax import analysis
from metake_jax.report import compare_table, paired_comparison

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- bootstrap (§11)


def test_paired_bootstrap_covers_true_difference():
    """Synthetic paired Bernoulli outcomes with a known mean difference: the 95 % interval covers
    it in most of 20 draws and says "better (+)"; shuffling b (breaking pairs) would not matter here,
    so the check is on coverage and width."""
    true_diff, covered, verdicts = 0.15, 0, []
    for s in range(20):
        rng = np.random.default_rng(s)
        n = 400
        u = rng.random(n)
        b = (u < 0.5).astype(float)
        a = (u < 0.5 + true_diff).astype(float)  # paired: a ≥ b case by case, P(a−b = 1) = 0.15
        d, lo, hi = analysis.paired_bootstrap(a, b, n_resamples=1000, seed=s)
        assert lo <= d <= hi
        covered += lo <= true_diff <= hi
        verdicts.append(analysis.verdict(lo, hi))
    assert covered >= 16, covered  # nominal 95 %: ≥ 16 of 20 (P(fail) ≈ 1.6e-2 at 95 % coverage)
    assert verdicts.count("better (+)") == 20


def test_paired_bootstrap_zero_difference_says_no_difference():
    rng = np.random.default_rng(0)
    a = rng.normal(size=300)
    b = a + rng.normal(size=300) * 0.5
    b = b - (b - a).mean()  # exact zero mean difference
    d, lo, hi = analysis.paired_bootstrap(a, b, n_resamples=1000)
    assert abs(d) < 1e-12 and lo < 0 < hi
    assert analysis.verdict(lo, hi) == "no difference"
    # identical outcomes: a degenerate interval [0, 0] is still "no difference"
    assert analysis.paired_bootstrap(a, a, n_resamples=1000) == (0.0, 0.0, 0.0)
    assert analysis.verdict(-0.3, -0.1) == "worse (−)"
    with pytest.raises(ValueError, match="1000"):
        analysis.paired_bootstrap(a, b, n_resamples=100)


# ----------------------------------------------------------------------------- binning (§10 Fig. 4)


def test_quantile_bins_match_numpy_reference():
    rng = np.random.default_rng(1)
    x = rng.lognormal(size=131)
    y = 0.5 * x / (1 + x) + 0.1 * rng.normal(size=131)
    out = analysis.quantile_bins(x, y, n_bins=13)
    order = np.argsort(x)
    sizes = [131 // 13 + (1 if j < 131 % 13 else 0) for j in range(13)]
    start = 0
    for j, k in enumerate(sizes):
        idx = order[start:start + k]
        start += k
        assert out["count"][j] == k
        np.testing.assert_allclose(out["x_mean"][j], x[idx].mean(), rtol=1e-12)
        np.testing.assert_allclose(out["y_mean"][j], y[idx].mean(), rtol=1e-12)
        se = np.sqrt(np.sum((y[idx] - y[idx].mean()) ** 2) / (k - 1)) / np.sqrt(k)
        np.testing.assert_allclose(out["y_se"][j], se, rtol=1e-12)
    assert np.all(np.diff(out["x_mean"]) > 0)
    np.testing.assert_allclose(analysis.attenuation(np.array([0.0, 1.0, 3.0])), [0.0, 0.5, 0.75])


def test_extreme_groups_and_best_on_grid():
    beta = np.array([5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0, 0.5])
    low, high = analysis.extreme_groups(beta, 0.2)
    assert sorted(beta[low]) == [0.5, 1.0] and sorted(beta[high]) == [8.0, 9.0]
    assert analysis.best_on_grid([0.25, 0.5, 1.0, 2.0], [10, 30, 30, 20]) == 0.5  # tie → smaller λ
    assert analysis.best_on_grid([2.0, 1.0, 0.5], [5, 7, 7]) == 0.5


# ----------------------------------------------------------------------------- MMD / shift (§10 Fig. 7)


def test_mmd2_zero_for_identical_positive_for_shifted():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(200, 16)).astype(np.float32)
    v0, sigma = analysis.rbf_mmd2(X, X.copy())
    assert abs(v0) < 1e-6 and sigma > 0
    v_same, _ = analysis.rbf_mmd2(X[:100], X[100:])  # two samples of one distribution: small
    v1, _ = analysis.rbf_mmd2(X, X + 1.0)
    assert v1 > 0.05 and v1 > 10 * abs(v_same)
    np.testing.assert_allclose(analysis.relative_shift(X, 2 * X), np.ones(200), rtol=1e-6)
    (p_ref, p_other), ratio = analysis.pca_2d(X, X + 1.0)
    assert p_ref.shape == (200, 2) and p_other.shape == (200, 2) and 0 < ratio.sum() <= 1


# ----------------------------------------------------------------------------- γ = β/(1+β) (Prop. 1)


@pytest.mark.parametrize("method", ["alphaedit", "memit"])
def test_realized_gamma_equals_attenuation_single_request(method):
    """ONE request, a single-layer write with C_p (AlphaEdit) / λ_C C0 (MEMIT), templates = bare
    prompt only (so the written key is the key at h_L's token): h_L^post − h_L = Δk = α r exactly,
    hence γ = α = β/(1+β) (docs/FORMULAS.md §5).  Oracle for the β / γ plumbing of measure_write."""
    from metake_jax.batch import EditBatch, prepare_batch
    from metake_jax.editor import EditConfig, EditState, edit_batch
    from metake_jax.keys import keys_and_hidden
    from metake_jax.requests import EditRequest
    from metake_jax.targets import StageIConfig
    from metake_jax.runner import load_model_spec
    from metake_jax import editors
    from metake_jax.editors import LayerStats

    cfg, params, tok = load_model_spec("random:llama:tiny")
    L, dk = 2, cfg.d_ff
    rng = np.random.default_rng(3)
    req = EditRequest(0, "France", "The capital of {} is", "Berlin")
    host, n = prepare_batch(tok, [req], [["{}"]])
    batch = EditBatch(*[jnp.asarray(x) for x in host])
    K, H = keys_and_hidden(cfg, params, batch, (L,))
    k = np.asarray(K[0][:, 0], np.float64)
    scale = float(k @ k)  # regularizers in units of ‖k‖², so that β = O(1)
    Q, _ = np.linalg.qr(rng.normal(size=(dk, dk)))
    P = Q[:, : dk // 2] @ Q[:, : dk // 2].T  # a rank-d_k/2 projector
    A = rng.normal(size=(dk, 6))
    Cp = scale / dk * (A @ A.T)  # earlier edits' keys
    C0 = np.eye(dk) + 0.1 / dk * (A @ A.T)
    l2, lam = 0.3 * scale, 0.5 * scale
    stats = LayerStats(*[jnp.asarray(x, jnp.float32)[None] for x in (P, C0, Cp)])
    state = EditState(params=params, stats=stats, n_edits=0)
    ecfg = EditConfig(layers=(L,), editor=editors.build(method, {"l2": l2} if method == "alphaedit" else {"mom2_update_weight": lam}))
    Z = H + jnp.asarray(rng.normal(size=H.shape).astype(np.float32)) * batch.valid  # any planned residual
    m = analysis.measure_write(cfg, state, batch, Z, ecfg, n)
    beta = m.beta[0]
    assert 0.05 < beta / (1 + beta) < 0.95, beta  # a non-trivial attenuation
    # β against a float64 numpy reference of docs/FORMULAS.md §5 (from the float32 matrices the editor saw)
    P32, C032, Cp32 = (np.asarray(x[0], np.float64) for x in stats)
    if method == "alphaedit":
        ref = k @ P32 @ np.linalg.solve(Cp32 @ P32 + np.float32(l2) * np.eye(dk), k)
    else:
        ref = k @ np.linalg.solve(np.float32(lam) * C032, k)
    np.testing.assert_allclose(beta, ref, rtol=1e-6)
    np.testing.assert_allclose(m.gamma[0], beta / (1 + beta), rtol=2e-4, atol=2e-5)
    assert m.state.n_edits == 1
    # the runner's path (edit_batch with EditConfig.measure, eval.association): Stage I targets, the same identity
    mcfg = EditConfig(layers=(L,), editor=ecfg.editor, stage1=StageIConfig(steps=3, lr=0.5), measure=True)
    new_state, rep = edit_batch(cfg, state, tok, [req], [["{}"]], mcfg)
    assert rep.beta.shape == rep.gamma.shape == rep.planned_norm.shape == (1,)
    np.testing.assert_allclose(rep.beta[0], ref, rtol=1e-6)
    np.testing.assert_allclose(rep.gamma[0], ref / (1 + ref), rtol=2e-4, atol=2e-5)
    assert rep.planned_norm[0] > 0 and new_state.n_edits == 1
    assert {"beta", "gamma", "planned_norm"} <= set(rep.summary())


def test_analyze_gamma_from_runs(tmp_path):
    """``launch/analyze.py --analysis=gamma --runs=...`` pools the β, γ that runs logged (results.json batches) per
    method and bins them: pooled arrays and bin means against numpy; a run without β is a one-line error."""
    import subprocess
    import sys

    rng = np.random.default_rng(7)
    pooled: dict[str, list[np.ndarray]] = {"memit": [], "metake": []}
    dirs = []
    for name, method in (("m0", "memit"), ("k0", "metake"), ("k1", "metake")):
        d = tmp_path / name
        d.mkdir()
        lines = []
        for b in range(2):
            beta = rng.lognormal(size=5)
            gamma = beta / (1 + beta) + 0.01 * rng.normal(size=5)
            pooled[method].append(np.stack([beta, gamma]))
            lines.append({"batch": b + 1, "case_ids": list(range(5 * b, 5 * b + 5)), "beta": beta.tolist(),
                          "gamma": gamma.tolist(), "planned_norm": np.ones(5).tolist()})
        (d / "results.json").write_text(json.dumps({"method": method, "kind": "counterfact", "batches": lines}))
        dirs.append(str(d))
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "launch" / "analyze.py"), "--analysis=gamma", "--bins=4", f"--out={out}",
           "--runs=" + ",".join(dirs)]
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    g = json.loads((out / "gamma.json").read_text())
    assert list(g["methods"]) == ["memit", "metake"]
    for method, parts in pooled.items():
        beta, gamma = np.concatenate(parts, axis=1)
        got = g["methods"][method]
        np.testing.assert_allclose(got["beta"], beta)
        np.testing.assert_allclose(got["gamma"], gamma)
        order = np.argsort(beta, kind="stable")  # numpy reference of 4 equal-count bins
        ref = [gamma[idx].mean() for idx in np.array_split(order, 4)]
        np.testing.assert_allclose(got["bins"]["y_mean"], ref)
    assert (out / "gamma.png").stat().st_size > 0 and "metake" in (out / "gamma.md").read_text()
    (tmp_path / "m0" / "results.json").write_text(json.dumps({"method": "memit", "batches": [{"batch": 1, "case_ids": [0]}]}))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "eval.association=True" in r.stderr and r.stderr.strip().count("\n") == 0


# ----------------------------------------------------------------------------- compare.py (§11)


def _fake_run(root: Path, name: str, method: str, data_seed: int, tseed: int, outcomes: dict[str, np.ndarray],
              case_ids: list[int]) -> Path:
    d = root / name
    d.mkdir()
    per_case = [{"case_id": c, "rewrite_success": float(outcomes["eff"][i]),
                 "paraphrase_success": float(outcomes["gen"][i]), "neighborhood_success": float(outcomes["spe"][i]),
                 "rewrite_magnitude": None, "paraphrase_magnitude": None, "neighborhood_magnitude": None}
                for i, c in enumerate(case_ids)]
    post = {k: 100 * float(np.mean(v)) for k, v in
            (("efficacy", outcomes["eff"]), ("generalization", outcomes["gen"]), ("specificity", outcomes["spe"]))}
    results = {"method": method, "kind": "counterfact", "n_cases": len(case_ids), "pre": None, "post": post,
               "batches": [], "config": {"data": {"seed": data_seed}, "templates": {"seed": tseed}}}
    (d / "results.json").write_text(json.dumps(results))
    (d / "eval_post.json").write_text(json.dumps({"case_ids": case_ids, "summary": post, "per_case": per_case}))
    return d


@pytest.fixture()
def fake_runs(tmp_path):
    rng = np.random.default_rng(4)
    n = 60
    runs, raw = [], {}
    for s in (0, 1):
        ids = list(range(100 * s, 100 * s + n))
        base = {k: (rng.random(n) < p).astype(float) for k, p in (("eff", 0.7), ("gen", 0.5), ("spe", 0.8))}
        better = {k: np.maximum(v, (rng.random(n) < 0.3).astype(float)) for k, v in base.items()}
        noise = {k: v.copy() for k, v in base.items()}
        noise["eff"][:2] = 1 - noise["eff"][:2]
        raw[s] = (base, better, noise)
        runs.append(_fake_run(tmp_path, f"a{s}", "alphaedit", s, 0, base, ids))
        runs.append(_fake_run(tmp_path, f"m{s}", "metake", s, 0, better, ids))
    runs.append(_fake_run(tmp_path, "a0_t1", "alphaedit", 0, 1, raw[0][2], list(range(n))))
    return runs, raw


def test_compare_paired_table_numbers(fake_runs, tmp_path, capsys):
    from launch import compare

    runs, raw = fake_runs
    out_json = tmp_path / "cmp.json"
    rc = compare.main(["--json", str(out_json), "--resamples", "1000"] + [str(r) for r in runs])
    assert rc == 0
    table = capsys.readouterr().out
    cmp = json.loads(out_json.read_text())
    labels = list(cmp["groups"])
    assert labels == ["alphaedit (templates seed 0)", "alphaedit (templates seed 1)", "metake"]
    assert cmp["baseline"] == "alphaedit (templates seed 0)"
    # mean ± std over data seeds (×100) against numpy
    eff_seed = [100 * raw[s][1]["eff"].mean() for s in (0, 1)]
    m = cmp["groups"]["metake"]["metrics"]["efficacy"]
    np.testing.assert_allclose(m["mean"], np.mean(eff_seed))
    np.testing.assert_allclose(m["std"], np.std(eff_seed, ddof=1))
    # paired difference over (seed, case) pairs against numpy
    row = next(c for c in cmp["comparisons"] if c["group"] == "metake" and c["metric"] == "generalization")
    d = np.concatenate([raw[s][1]["gen"] - raw[s][0]["gen"] for s in (0, 1)])
    np.testing.assert_allclose(row["diff"], 100 * d.mean())
    assert row["n_pairs"] == 120 and row["ci"][0] <= row["diff"] <= row["ci"][1]
    assert row["verdict"] == "better (+)"
    # the noise floor: same method, template seed perturbed, 2 of 60 outcomes flipped
    nf = [c for c in cmp["comparisons"] if c["kind"] == "noise floor"]
    assert {c["metric"] for c in nf} == {"efficacy", "generalization", "specificity"}
    assert all(c["verdict"] == "no difference" for c in nf)
    assert "| metake − alphaedit (templates seed 0) | generalization | 120 |" in table
    assert f"{np.mean(eff_seed):.2f} ± {np.std(eff_seed, ddof=1):.2f}" in table


def test_compare_errors_and_plain_table(fake_runs, tmp_path, capsys):
    from launch import compare

    runs, _ = fake_runs
    # plain table (compare_table) still works on the same directories
    assert compare.main([str(runs[0]), str(runs[1])]) == 0
    plain = capsys.readouterr().out
    assert plain.splitlines()[0].startswith("| method | efficacy |") and "| metake |" in plain
    assert compare_table([json.loads((runs[0] / "results.json").read_text())]).count("\n") == 2
    # missing eval_post.json → one-line error
    (runs[1] / "eval_post.json").unlink()
    assert compare.main(["--paired", str(runs[0]), str(runs[1])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "eval_post.json not found" in err and "\n" not in err
    # a shared seed with different cases
    bad = _fake_run(tmp_path, "mbad", "metake", 0, 0, {k: np.ones(5) for k in ("eff", "gen", "spe")},
                    list(range(500, 505)))
    assert compare.main(["--paired", str(runs[0]), str(bad)]) == 2
    assert "edited different cases" in capsys.readouterr().err
    with pytest.raises(ValueError, match="baseline"):
        paired_comparison([{"name": "x", "results": json.loads((runs[0] / "results.json").read_text()),
                            "post": json.loads((runs[0] / "eval_post.json").read_text())}], baseline="nope")
