"""MetaKE (docs/FORMULAS.md §6) and the exact hypergradient (§7): identities and finite differences."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metake_jax.batch import EditBatch, prepare_batch
from metake_jax.editor import EditConfig, edit_batch, init_state
from metake_jax.errors import EditError
from metake_jax.hypergrad import diagnostics, exact_F, exact_hypergradient, prepare_exact, proxy_hypergradient
from metake_jax.metake import MetaKEConfig, refine_targets
from metake_jax.targets import StageIConfig, optimize_targets
from metake_jax.editors import LayerStats
from metake_jax.editors.alphaedit import AlphaEdit
from metake_jax.editors.memit import MEMIT
from tests.tiny import tiny_model, tiny_tokenizer

TEMPLATES = [["{}"], ["The cat. {}"]]
REQS = [
    SimpleNamespace(case_id=1, subject="France", prompt="The capital of {} is", target_new="Berlin"),
    SimpleNamespace(case_id=2, subject="Toko Yasuda", prompt="{} plays the", target_new="piano"),
]
LAYERS = (1, 2)
ECFG = AlphaEdit(l2=1.0)


def _stats(d_k: int, m: int, seed: int = 0, dtype=np.float32) -> LayerStats:
    rng = np.random.RandomState(seed)
    Ps, C0s = [], []
    for _ in range(m):
        A = rng.randn(d_k, 4 * d_k)
        C0 = A @ A.T / (4 * d_k)
        _, U = np.linalg.eigh(C0)
        Ps.append(U[:, : d_k // 2] @ U[:, : d_k // 2].T)
        C0s.append(C0)
    Cp = np.zeros((m, d_k, d_k))
    B = rng.randn(m, d_k, 3)
    Cp += np.einsum("mkn,mjn->mkj", B, B) * 0.1
    cast = lambda x: jnp.asarray(np.stack(x) if isinstance(x, list) else x, dtype)  # noqa: E731
    return LayerStats(P=cast(Ps), C0=cast(C0s), Cp=cast(Cp))


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    cfg, params = tiny_model("llama", seed=1)
    b, _ = prepare_batch(tok, REQS, TEMPLATES)
    b = EditBatch(*map(jnp.asarray, b))
    Z0 = optimize_targets(cfg, params, b, LAYERS[-1], StageIConfig(steps=4, lr=0.5, weight_decay=0.0)).Z
    return tok, cfg, params, b, Z0


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_single_layer_proxy_equals_exact(setup):
    _, cfg, params, b, Z0 = setup
    st = _stats(cfg.d_ff, 1)
    Z = Z0 + 0.01  # away from the anchor so its gradient is non-zero too
    ge = exact_hypergradient(cfg, params, b, Z, Z0, (2,), st, ECFG)
    gp = proxy_hypergradient(cfg, params, b, Z, Z0, (2,), st, ECFG)
    assert float(jnp.linalg.norm(ge)) > 0
    assert _rel(gp, ge) <= 1e-5


def test_multi_layer_proxy_differs_but_correlates(setup):
    _, cfg, params, b, Z0 = setup
    st = _stats(cfg.d_ff, 2)
    d = diagnostics(cfg, params, b, Z0, Z0, LAYERS, st, ECFG, MetaKEConfig(), 0.1)
    cos = np.asarray(d.cos)[:2]
    assert np.all(np.isfinite(cos)) and np.all(cos <= 1 + 1e-6)
    assert _rel(d.g_proxy, d.g_exact) > 1e-6  # the non-final layers leak: not identical
    assert np.asarray(d.reduction_bp)[3, :2] == pytest.approx(0.0, abs=1e-6)  # g = 0 changes nothing
    assert np.asarray(d.reduction_eq_bp)[3, :2] == pytest.approx(0.0, abs=1e-6)
    # the proxy direction's equal-length step is its own step at η: same reduction
    np.testing.assert_allclose(np.asarray(d.reduction_eq_bp)[1, :2], np.asarray(d.reduction_bp)[1, :2],
                               rtol=1e-4, atol=1e-3)
    for c in (d.cos_final_exact, d.cos_proxy_final):
        c = np.asarray(c)[:2]
        assert np.all(np.isfinite(c)) and np.all(np.abs(c) <= 1 + 1e-6)


def test_single_layer_diagnostics_identities(setup):
    """One edited layer: g_final = g_exact = g_proxy, so all three cosines are 1 and ρ = 0 (docs/FORMULAS.md §7)."""
    _, cfg, params, b, Z0 = setup
    st = _stats(cfg.d_ff, 1)
    d = diagnostics(cfg, params, b, Z0 + 0.01 * b.valid, Z0, (2,), st, ECFG, MetaKEConfig(), 0.1)
    for c in (d.cos, d.cos_final_exact, d.cos_proxy_final):
        np.testing.assert_allclose(np.asarray(c)[:2], 1.0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(d.leakage)[:2], 0.0, atol=1e-6)


def test_exact_hypergradient_matches_finite_differences_float64(setup):
    tok, cfg, params, _, _ = setup
    with jax.enable_x64(True):
        cfg64 = cfg.replace(compute_dtype="float64", param_dtype="float64")
        p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
        b, _ = prepare_batch(tok, REQS, TEMPLATES)
        b = EditBatch(*[jnp.asarray(x, jnp.float64) if np.asarray(x).dtype == np.float32 else jnp.asarray(x)
                        for x in b])
        st = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), _stats(cfg.d_ff, 2))
        e64 = dataclasses.replace(ECFG, solve_dtype="float64")
        rng = np.random.RandomState(3)
        Z0 = jnp.asarray(rng.randn(cfg.d_model, b.valid.shape[0]), jnp.float64) * b.valid
        Z = Z0 + 0.05 * jnp.asarray(rng.randn(*Z0.shape)) * b.valid
        g = exact_hypergradient(cfg64, p64, b, Z, Z0, LAYERS, st, e64)
        ectx = prepare_exact(cfg64, p64, b, LAYERS)
        F = jax.jit(lambda z: jnp.sum(exact_F(cfg64, p64, b, LAYERS, st, e64, ectx, z, Z0) * b.valid))
        for k in range(2):
            v = jnp.asarray(rng.randn(*Z.shape)) * b.valid
            h = 1e-4
            fd = (F(Z + h * v) - F(Z - h * v)) / (2 * h)
            an = jnp.sum(g * v)
            assert abs(float(fd - an)) <= 1e-4 * abs(float(an)), (float(fd), float(an))


def test_lookahead_increment_from_B_equals_gate_form(setup):
    """Δ_Lᵀ from B = K_Lᵀ G (formed once per batch) equals (R K_Lᵀ G)ᵀ with the d_k × d_k structural
    gate G = P((KKᵀ + C_p)P + λI)⁻¹ (eq. 8), and the editor's own write of the same residual."""
    from metake_jax.editors.alphaedit import alphaedit_gate
    from metake_jax.editors.linalg import increment_from_gate
    from metake_jax.keys import keys_and_hidden
    from metake_jax.metake import lookahead_increment, prepare_lookahead

    _, cfg, params, b, Z0 = setup
    st = _stats(cfg.d_ff, 2, seed=5)
    ctx = prepare_lookahead(cfg, params, b, LAYERS, st, ECFG, MetaKEConfig())
    K, H = keys_and_hidden(cfg, params, b, LAYERS)
    G = alphaedit_gate(K[-1], st.P[-1], st.Cp[-1], ECFG.l2)
    Z = Z0 + 0.01 * b.valid
    ref = increment_from_gate(K[-1], (Z - H) * b.valid, G)
    written, _ = ECFG.increment(K[-1], (Z - H) * b.valid, len(LAYERS) - 1, st)
    assert _rel(written, ref) <= 1e-4
    got = lookahead_increment(ctx, Z, b.valid)
    assert float(jnp.linalg.norm(ref)) > 0
    assert _rel(got, ref) <= 1e-5


def test_refinement_lowers_meta_loss_and_ablations_differ(setup):
    _, cfg, params, b, Z0 = setup
    st = _stats(cfg.d_ff, 2)
    outs = {}
    for name, mc in {
        "metake": MetaKEConfig(steps=3, lr=0.5),
        "keyonly": MetaKEConfig(steps=3, lr=0.5, gate="keyonly"),
        "ungated": MetaKEConfig(steps=3, lr=0.5, feedback="ungated"),
    }.items():
        r = refine_targets(cfg, params, b, Z0, LAYERS, st, ECFG, mc)
        outs[name] = r
        curve = np.asarray(r.losses)[:, :2]
        if mc.feedback == "gated":  # ungated feedback is not a gradient of ℓ_meta: no descent guarantee
            assert (curve[-1] < curve[0]).all(), name
    assert _rel(outs["metake"].Z, outs["keyonly"].Z) > 1e-7
    assert _rel(outs["metake"].Z, outs["ungated"].Z) > 1e-7


@pytest.mark.parametrize("anchor,search", [("relative", "request"), ("absolute", "request"),
                                           ("relative", "batch")])
def test_meta_loss_never_rises_along_the_scan(setup, anchor, search):
    """Armijo backtracking: every request's ℓ_meta ("request") / the batch's Σ ℓ_meta ("batch") is
    non-increasing at every outer step, also at a step size so large that plain gradient descent
    overshoots (docs/FORMULAS.md §6)."""
    _, cfg, params, b, Z0 = setup
    st = _stats(cfg.d_ff, 2)
    lr = 50.0 if anchor == "relative" else 20.0
    plain = refine_targets(cfg, params, b, Z0, LAYERS, st, ECFG,
                           MetaKEConfig(steps=6, lr=lr, anchor=anchor, line_search="none"))
    assert (np.diff(np.asarray(plain.losses)[:, :2], axis=0) > 0).any()  # overshoots without the search
    mc = MetaKEConfig(steps=6, lr=lr, anchor=anchor, line_search=search)
    r = refine_targets(cfg, params, b, Z0, LAYERS, st, ECFG, mc)
    curve = np.asarray(r.losses)[:, :2]
    if search == "request":
        assert (np.diff(curve, axis=0) <= 0).all(), curve
        assert (curve[-1] < curve[0]).all()
    total = curve.sum(1)
    assert (np.diff(total) <= 0).all() and total[-1] < total[0], total
    assert (np.asarray(r.step_sizes)[:, :2] < lr).any()  # the search did backtrack
    assert (np.asarray(r.trials) > 1).any()
    # the recorded losses are ℓ_meta at the returned Z (recomputed independently)
    from metake_jax.metake import meta_loss, prepare_lookahead

    ctx = prepare_lookahead(cfg, params, b, LAYERS, st, ECFG, mc)
    _, per = meta_loss(cfg, params, b, LAYERS[-1], ctx, r.Z, Z0, mc)
    np.testing.assert_allclose(np.asarray(per)[:2], curve[-1], rtol=1e-5)


def _scaled_model(params, s):
    """The residual stream × s: embeddings, attention-out and FFN-out kernels × s (pre-norm model:
    same function, hidden states × s)."""
    p = jax.tree.map(lambda x: x, params)
    p["embed"] = {"wte": params["embed"]["wte"] * s}
    p["layers"] = dict(params["layers"])
    p["layers"]["attn"] = dict(params["layers"]["attn"], o={"kernel": params["layers"]["attn"]["o"]["kernel"] * s})
    p["layers"]["mlp"] = dict(params["layers"]["mlp"], fc_out={"kernel": params["layers"]["mlp"]["fc_out"]["kernel"] * s})
    return p


def test_refinement_is_invariant_to_residual_stream_scale():
    """anchor="relative": Z^(T)(s) / s is the same for s ∈ {1, 10, 100} (≤ 1e-4 relative), with the
    same Z⁰ scaled by s; the literal absolute reading is not invariant (docs/FORMULAS.md §6 "Units")."""
    tok = tiny_tokenizer()
    cfg, params = tiny_model("llama", seed=1, rms_norm_eps=1e-12)  # eps ≪ ms(h): exactly scale-free norms
    b, _ = prepare_batch(tok, REQS, TEMPLATES)
    b = EditBatch(*map(jnp.asarray, b))
    st = _stats(cfg.d_ff, 2)
    Z0 = optimize_targets(cfg, params, b, LAYERS[-1], StageIConfig(steps=4, lr=0.5, weight_decay=0.0)).Z
    out = {}
    for anchor in ("relative", "absolute"):
        mc = MetaKEConfig(steps=5, lr=0.5 if anchor == "relative" else 0.05, anchor=anchor)
        for s in (1.0, 10.0, 100.0):
            r = refine_targets(cfg, _scaled_model(params, s), b, Z0 * s, LAYERS, st, ECFG, mc)
            out[anchor, s] = np.asarray(r.Z)[:, :2] / s
        assert np.linalg.norm(out[anchor, 1.0] - np.asarray(Z0)[:, :2]) > 1e-3 * np.linalg.norm(np.asarray(Z0)[:, :2])
    for s in (10.0, 100.0):
        ref = out["relative", 1.0]
        assert np.linalg.norm(out["relative", s] - ref) <= 1e-4 * np.linalg.norm(ref), s
    move = lambda a, s: np.linalg.norm(out[a, s] - np.asarray(Z0)[:, :2])  # noqa: E731
    assert move("absolute", 100.0) < 0.1 * move("absolute", 1.0)  # literal reading: the move vanishes with s


@pytest.mark.parametrize("ablation", [dict(steps=0), dict(feedback="stopgrad")])
def test_no_bilevel_and_stopgrad_give_exactly_alphaedit(setup, ablation):
    """T = 0, and stop-grad feedback (only the anchor's gradient, zero at Z⁰), write exactly the
    AlphaEdit weights (docs/FORMULAS.md §6, Table 2)."""
    tok, cfg, params, _, _ = setup
    st = _stats(cfg.d_ff, 2)
    state = init_state(params, cfg, LAYERS, P=st.P, C0=st.C0)
    base = EditConfig(layers=LAYERS, stage1=StageIConfig(steps=3, lr=0.5), editor=ECFG)
    s_ae, _ = edit_batch(cfg, state, tok, REQS, TEMPLATES, base)
    mc = dataclasses.replace(MetaKEConfig(steps=3, lr=0.5), **ablation)
    s_ab, rep = edit_batch(cfg, state, tok, REQS, TEMPLATES, dataclasses.replace(base, metake=mc))
    k_ae = np.asarray(s_ae.params["layers"]["mlp"]["fc_out"]["kernel"])
    np.testing.assert_array_equal(k_ae, np.asarray(s_ab.params["layers"]["mlp"]["fc_out"]["kernel"]))
    k0 = np.asarray(params["layers"]["mlp"]["fc_out"]["kernel"])
    assert np.abs(k_ae - k0)[list(LAYERS)].max() > 0  # something was written
    # while the default refinement does change the written weights
    s_mk, _ = edit_batch(cfg, state, tok, REQS, TEMPLATES,
                         dataclasses.replace(base, metake=MetaKEConfig(steps=3, lr=0.5)))
    assert np.abs(np.asarray(s_mk.params["layers"]["mlp"]["fc_out"]["kernel"]) - k_ae).max() > 0


def test_bare_prompt_lookahead_scores_the_bare_and_kl_rows(setup):
    """select_rows keeps exactly the bare + KL rows: the virtual losses equal the full batch's
    losses re-weighted onto those rows (an identity of the batching, docs/FORMULAS.md §6)."""
    from metake_jax.batch import rows_per_request, select_rows
    from metake_jax.metake import prepare_lookahead, virtual_losses

    tok, cfg, params, b, Z0 = setup
    st = _stats(cfg.d_ff, 2)
    per = rows_per_request(b)
    bare = int(np.asarray(b.bare_row)[0])
    hb = EditBatch(*[np.asarray(x) for x in b])
    sub = EditBatch(*map(jnp.asarray, select_rows(hb, (bare, per - 1))))
    assert sub.tokens.shape[0] == 2 * b.valid.shape[0]
    mc = MetaKEConfig()
    ctx_full = prepare_lookahead(cfg, params, b, LAYERS, st, ECFG, mc)
    ctx_sub = prepare_lookahead(cfg, params, b, LAYERS, st, ECFG, mc, sub)
    np.testing.assert_array_equal(np.asarray(ctx_full.B), np.asarray(ctx_sub.B))
    Z = Z0 + 0.01
    e_sub, l_sub = virtual_losses(cfg, params, sub, LAYERS[-1], ctx_sub, Z, mc)
    onehot = np.zeros_like(hb.nll_avg)
    onehot[np.arange(onehot.shape[0]), np.asarray(hb.bare_row)] = 1.0
    full_bare = b._replace(nll_avg=jnp.asarray(onehot))
    e_full, l_full = virtual_losses(cfg, params, full_bare, LAYERS[-1], ctx_full, Z, mc)
    np.testing.assert_allclose(np.asarray(e_sub)[:2], np.asarray(e_full)[:2], rtol=1e-5)
    # KL values are ~1e-6 here; float32 cancellation in Σ p (log p − log p0) gives ~1e-7 noise
    np.testing.assert_allclose(np.asarray(l_sub)[:2], np.asarray(l_full)[:2], rtol=1e-3, atol=1e-6)


def test_cp_update_and_nonfinite_cache_keeps_state(setup):
    """C_p ← C_p + K Kᵀ with K the batch's keys on the EDITED model (docs/FORMULAS.md §4; float64 oracle);
    a non-finite C_p update refuses the whole batch and leaves the input state as it was."""
    from metake_jax.keys import keys_and_hidden

    tok, cfg, params, b, _ = setup
    st = _stats(cfg.d_ff, 2, seed=3)
    state = init_state(params, cfg, LAYERS, P=st.P, C0=st.C0)._replace(stats=st)
    ecfg = EditConfig(layers=LAYERS, stage1=StageIConfig(steps=2, lr=0.5), editor=ECFG)
    new, _ = edit_batch(cfg, state, tok, REQS, TEMPLATES, ecfg)
    K, _ = keys_and_hidden(cfg, new.params, b, LAYERS)
    K = np.asarray(K, np.float64)
    KKt = np.einsum("mkn,mjn->mkj", K, K)
    added = np.asarray(new.stats.Cp, np.float64) - np.asarray(st.Cp, np.float64)
    assert np.linalg.norm(KKt) > 0
    assert np.linalg.norm(added - KKt) <= 1e-4 * np.linalg.norm(KKt)

    # MEMIT without the cache in its solve writes finite weights; a NaN already in C_p makes the update non-finite
    bad = st._replace(Cp=st.Cp.at[0, 0, 0].set(jnp.nan))
    state = init_state(params, cfg, LAYERS, P=st.P, C0=st.C0)._replace(stats=bad)
    kern = np.asarray(params["layers"]["mlp"]["fc_out"]["kernel"])
    memit = dataclasses.replace(ecfg, editor=MEMIT(mom2_update_weight=1.0))
    with pytest.raises(EditError, match="non-finite keys after the edit: batch not written"):
        edit_batch(cfg, state, tok, REQS, TEMPLATES, memit)
    np.testing.assert_array_equal(np.asarray(state.params["layers"]["mlp"]["fc_out"]["kernel"]), kern)
    assert state.n_edits == 0


@pytest.mark.parametrize("prompts,feedback,pack", [("all", "gated", False), ("bare", "gated", False),
                                                   ("all", "ungated", False), ("all", "gated", True),
                                                   ("bare", "gated", True)])
def test_grouped_look_rows_change_no_number(setup, prompts, feedback, pack):
    """The look rows in length-sorted groups, each cut to its own width (``group_look_rows``), or packed side
    by side (``pack_look_rows``, what the runner uses), give the refined Z, the ℓ_meta curve and the accepted
    steps of the plain rows (real requests; packing drops the padding requests' rows)."""
    from metake_jax.batch import rows_per_request, select_rows
    from metake_jax.editor import look_rows
    from metake_jax.metake import LookRows, PackedRows

    tok, cfg, params, b, Z0 = setup
    st = _stats(cfg.d_ff, 2)
    # ungated: plain steps (the Armijo accept/reject is a discrete decision; KL terms of ~1e-4 carry ~1e-7
    # float32 noise that can flip it on this tiny model, grouped or not)
    mc = MetaKEConfig(steps=4, lr=0.05, prompts=prompts, feedback=feedback,
                      line_search="batch" if feedback == "gated" else "none")
    hb = EditBatch(*[np.asarray(x) for x in b])
    per = rows_per_request(hb)
    plain_rows = None if prompts == "all" else EditBatch(*map(jnp.asarray, select_rows(hb, (int(hb.bare_row[0]), per - 1))))
    grouped = look_rows(hb, mc, pack=pack)
    rows = b if plain_rows is None else plain_rows
    if pack:
        (g,) = grouped.groups
        assert isinstance(g, PackedRows)
        assert g.tokens.size <= int(np.asarray(rows.mask).size)  # no more positions than the plain rows
        if prompts == "all":
            assert g.tokens.size < int(np.asarray(rows.mask).size)  # template rows of several lengths: fewer
        assert int(g.mask.sum()) == int(np.asarray(rows.mask)[np.repeat(hb.valid > 0, per if plain_rows is None
                                                                       else 2)].sum())
    else:
        assert isinstance(grouped, LookRows) and len(grouped.groups) > 1
        widths = [g.tokens.shape[1] for g in grouped.groups]
        if prompts == "all":
            assert min(widths) < rows.tokens.shape[1]  # some group is actually cut shorter (template rows vs bare rows)
    ref = refine_targets(cfg, params, b, Z0, LAYERS, st, ECFG, mc, plain_rows)
    got = refine_targets(cfg, params, b, Z0, LAYERS, st, ECFG, mc, grouped)
    assert _rel(got.Z, Z0) > 1e-4  # the refinement moved Z
    real = np.asarray(hb.valid) > 0
    np.testing.assert_allclose(np.asarray(got.Z)[:, real], np.asarray(ref.Z)[:, real], rtol=1e-5,
                               atol=1e-5 * float(jnp.abs(ref.Z).max()))
    np.testing.assert_allclose(np.asarray(got.losses)[:, real], np.asarray(ref.losses)[:, real], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(got.trials), np.asarray(ref.trials))
