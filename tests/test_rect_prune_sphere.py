"""RECT, PRUNE and SPHERE (docs/FORMULAS.md §B3, §B2, §B6) against float64 numpy transcriptions of the
reference formulas (BASELINES.md §3, §2, §6) and their identities (keep = 1, unbounded restraint and
α = 0 give MEMIT / MEMIT / AlphaEdit exactly)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metake_jax import editors
from metake_jax.batch import EditBatch, prepare_batch
from metake_jax.editors import LayerStats, NotGatedError
from metake_jax.editors.alphaedit import AlphaEdit
from metake_jax.editors.memit import MEMIT
from metake_jax.editors.prune import PRUNE, prune_readout, restrain_singular_values
from metake_jax.editors.rect import RECT, rect_mask
from metake_jax.editors.sphere import SPHERE, soft_projector, sphere_project
from tests.test_editor_registry import _stats  # random P, C0, C_p stacks (one recipe)
from tests.tiny import tiny_model, tiny_tokenizer


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# ----------------------------------------------------------------------------- numpy oracles (BASELINES.md)


def np_rect(delta, W, keep):
    """BASELINES.md §3: ρ = |Δ/(W + 1e-8)|, τ = the ⌊(1−keep)N⌋-th smallest (1-indexed), keep ρ ≥ τ."""
    rho = np.abs(delta / (W + 1e-8))
    k = int(np.floor((1 - keep) * rho.size))
    if k == 0:
        return delta.copy()
    tau = np.sort(rho, axis=None)[k - 1]
    return np.where(rho >= tau, delta, 0.0)


def np_prune(W, W0, alpha):
    """BASELINES.md §2 (SP): W0 + U diag(σ') Vᵀ of Δ_acc = W − W0, σ̄ = σ_max(W0), log_α compression above σ̄."""
    U, s, Vt = np.linalg.svd(W - W0, full_matrices=False)
    sb = np.linalg.svd(W0, compute_uv=False)[0]
    s2 = np.where(s <= sb, s, np.log(np.maximum(s, 1e-300)) / np.log(alpha) - np.log(sb) / np.log(alpha) + sb)
    return W0 + (U * s2) @ Vt


def np_soft_projector(A, beta, alpha):
    """BASELINES.md §6 ``project_B_into_soft_dirs``: A as stored (rows = neurons)."""
    A_hat = A / (np.linalg.norm(A, axis=1, keepdims=True) + 1e-8)
    C = A_hat.T @ A_hat / A.shape[0]
    lam, vec = np.linalg.eigh(C)
    order = np.argsort(lam)[::-1]
    lam, vec = lam[order], vec[:, order]
    r = int(np.sum(np.cumsum(lam) / lam.sum() <= beta)) + 1
    U = vec[:, :r]
    return np.eye(A.shape[1]) - alpha * U @ U.T


def np_sphere(B_stored, A_stored, beta, alpha):
    """B' = B P_sᵀ in the stored layout (the reference's ``B @ P.T``)."""
    return B_stored @ np_soft_projector(A_stored, beta, alpha).T


# ----------------------------------------------------------------------------- RECT


@pytest.mark.parametrize("keep", [0.4, 0.2, 0.73])
def test_rect_mask_matches_numpy_float64(keep):
    rng = np.random.default_rng(0)
    m, dk, d = 3, 17, 9
    delta, W = rng.normal(size=(m, dk, d)), rng.normal(size=(m, dk, d))
    with jax.enable_x64(True):
        got = np.asarray(rect_mask(jnp.asarray(delta), jnp.asarray(W), keep))
    want = np.stack([np_rect(delta[j], W[j], keep) for j in range(m)])
    np.testing.assert_array_equal(got, want)
    n = dk * d
    kept = (got != 0).reshape(m, -1).sum(1)
    assert (kept == n - int(np.floor((1 - keep) * n)) + 1).all()  # distinct ρ: N − k + 1 entries kept


def test_rect_float32_and_ties_kept():
    rng = np.random.default_rng(1)
    delta = rng.normal(size=(2, 12, 8)).astype(np.float32)
    delta[:, :, :6] = 0.0  # 75% of the entries have ρ = 0 = τ (keep 0.4): all kept (ties), nothing zeroed
    W = rng.normal(size=(2, 12, 8)).astype(np.float32)
    got = np.asarray(rect_mask(jnp.asarray(delta), jnp.asarray(W), 0.4))
    np.testing.assert_array_equal(got, delta)
    delta = rng.normal(size=(2, 12, 8)).astype(np.float32)
    got = np.asarray(rect_mask(jnp.asarray(delta), jnp.asarray(W), 0.4))
    np.testing.assert_array_equal(got, np.stack([np_rect(delta[j], W[j], 0.4) for j in range(2)]).astype(np.float32))


def test_rect_keep_one_is_identity_and_bad_keep_named():
    rng = np.random.default_rng(2)
    delta, W = (jnp.asarray(rng.normal(size=(2, 5, 4)), jnp.float32) for _ in range(2))
    np.testing.assert_array_equal(np.asarray(RECT(keep=1.0).finalize(delta, W)), np.asarray(delta))
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"editor\.rect\.keep"):
            RECT(keep=bad)
    with pytest.raises(NotGatedError):
        RECT().gate(jnp.zeros((4, 2)), 0, LayerStats(None, jnp.eye(4)[None], jnp.zeros((1, 4, 4))))


# ----------------------------------------------------------------------------- PRUNE


def _prune_case(rng, dk=14, d=9, scale=6.0):
    W0 = rng.normal(size=(dk, d)) / np.sqrt(d)
    D = scale * np.outer(rng.normal(size=dk), rng.normal(size=d)) + 0.05 * rng.normal(size=(dk, d))
    return W0 + D, W0


@pytest.mark.parametrize("alpha", [math.e, 1.2, 2.0])
def test_prune_readout_matches_numpy_float64(alpha):
    rng = np.random.default_rng(3)
    cases = [_prune_case(rng) for _ in range(3)]
    W, W0 = np.stack([c[0] for c in cases]), np.stack([c[1] for c in cases])
    assert all(np.linalg.svd(W[j] - W0[j], compute_uv=False)[0] > np.linalg.svd(W0[j], compute_uv=False)[0]
               for j in range(3))  # the restraint is active in every layer
    with jax.enable_x64(True):
        got = np.asarray(prune_readout(jnp.asarray(W), jnp.asarray(W0), alpha))
    want = np.stack([np_prune(W[j], W0[j], alpha) for j in range(3)])
    assert rel(got, want) <= 1e-10
    # the restrained accumulated edit has the compressed spectrum: σ'_1 = log_α σ_1 − log_α σ̄ + σ̄
    s = np.linalg.svd(W[0] - W0[0], compute_uv=False)
    sb = np.linalg.svd(W0[0], compute_uv=False)[0]
    s_got = np.linalg.svd(got[0] - W0[0], compute_uv=False)
    assert s_got[0] == pytest.approx(math.log(s[0], alpha) - math.log(sb, alpha) + sb, rel=1e-10)


def test_prune_float32_close_to_oracle():
    rng = np.random.default_rng(4)
    W, W0 = _prune_case(rng, 40, 24)
    got = prune_readout(jnp.asarray(W[None], jnp.float32), jnp.asarray(W0[None], jnp.float32), math.e)
    want = np_prune(np.float32(W).astype(np.float64), np.float32(W0).astype(np.float64), math.e)
    assert rel(np.asarray(got)[0] - W0, want - W0) <= 1e-5


def test_prune_unbounded_is_the_stream_exactly():
    rng = np.random.default_rng(5)
    W0 = jnp.asarray(rng.normal(size=(2, 10, 6)), jnp.float32)
    W = W0 + 1e-3 * jnp.asarray(rng.normal(size=(2, 10, 6)), jnp.float32)  # every σ ≤ σ̄
    np.testing.assert_array_equal(np.asarray(PRUNE().readout(W, W0)), np.asarray(W))
    s = jnp.asarray([5.0, 3.0, 1.0])
    np.testing.assert_array_equal(np.asarray(restrain_singular_values(s, jnp.inf, math.e)), np.asarray(s))
    with pytest.raises(ValueError, match=r"editor\.prune\.alpha"):
        PRUNE(alpha=1.0)


# ----------------------------------------------------------------------------- SPHERE


def _kernel(rng, dk=20, d=12):
    """A kernel (d_k, d) with a few dominant directions so the energy spectrum has clear gaps."""
    return rng.normal(size=(dk, d)) + 3.0 * np.outer(rng.normal(size=dk), rng.normal(size=d))


@pytest.mark.parametrize("beta,alpha", [(0.5, 0.5), (0.8, 0.8), (0.0, 1.0)])
def test_sphere_projector_and_layouts_match_numpy_float64(beta, alpha):
    rng = np.random.default_rng(6)
    kern, inc = _kernel(rng), rng.normal(size=(20, 12))
    with jax.enable_x64(True):
        Ps_out = np.asarray(soft_projector(jnp.asarray(kern), beta, alpha, "out"))
        got_out = np.asarray(sphere_project(jnp.asarray(inc), jnp.asarray(kern), beta, alpha, "out"))
        got_in = np.asarray(sphere_project(jnp.asarray(inc), jnp.asarray(kern), beta, alpha, "in"))
    # HF Linear (GPT-J, Llama, SmolLM2): stored W = kernelᵀ (d × d_k), B = Δ = incᵀ; our result is B'ᵀ
    assert rel(Ps_out, np_soft_projector(kern.T, beta, alpha)) <= 1e-10
    assert rel(got_out, np_sphere(inc.T, kern.T, beta, alpha).T) <= 1e-10
    # GPT-2 Conv1D: stored W = kernel (d_k × d), B = the stored increment = inc
    assert rel(got_in, np_sphere(inc, kern, beta, alpha)) <= 1e-10
    assert rel(got_out, got_in) > 1e-3  # the layout matters


def test_sphere_float32_close_to_oracle_and_alpha_zero_is_identity():
    rng = np.random.default_rng(7)
    kern, inc = _kernel(rng), rng.normal(size=(20, 12))
    got = sphere_project(jnp.asarray(inc, jnp.float32), jnp.asarray(kern, jnp.float32), 0.5, 0.5, "out")
    assert rel(got, np_sphere(inc.T, kern.T, 0.5, 0.5).T) <= 1e-5
    for neurons in ("out", "in"):
        same = SPHERE(alpha=0.0, neurons=neurons).project(jnp.asarray(inc, jnp.float32),
                                                          jnp.asarray(kern, jnp.float32), 0)
        np.testing.assert_array_equal(np.asarray(same), np.asarray(jnp.asarray(inc, jnp.float32)))
    for bad in (dict(beta=1.5), dict(alpha=-0.1), dict(neurons="rows")):
        with pytest.raises(ValueError, match=r"editor\.sphere\." + next(iter(bad))):
            SPHERE(**bad)


def test_sphere_gate_absorbs_the_projection_out_layout_only():
    """project(increment(K, R), W) == (R · project_gate(gate(K), W))ᵀ: the SPHERE update is Δ = R·(B P_s)."""
    rng = np.random.default_rng(8)
    dk, d, n = 16, 7, 4
    st = _stats(dk, 2, 9)
    K = jnp.asarray(rng.normal(size=(dk, n)), jnp.float32)
    R = jnp.asarray(rng.normal(size=(d, n)), jnp.float32)
    W = jnp.asarray(_kernel(rng, dk, d), jnp.float32)
    ed = SPHERE(solve_dtype="float64")
    inc = ed.project(ed.increment(K, R, 1, st)[0], W, 1)
    B = ed.project_gate(ed.gate(K, 1, st), W, 1)
    np.testing.assert_allclose(np.asarray(inc, np.float64), (np.asarray(R, np.float64) @ np.asarray(B, np.float64)).T,
                               rtol=1e-4, atol=1e-6 * float(jnp.abs(inc).max()))
    with pytest.raises(NotGatedError, match="neurons='in'"):
        SPHERE(neurons="in").project_gate(ed.gate(K, 1, st), W, 1)
    from metake_jax.editor import EditConfig
    from metake_jax.metake import MetaKEConfig

    assert ed.is_gated() and not SPHERE(neurons="in").is_gated()
    EditConfig(layers=(1, 2), editor=ed, metake=MetaKEConfig())
    with pytest.raises(NotGatedError, match="sphere"):  # refused when the run is configured, not at batch 1
        EditConfig(layers=(1, 2), editor=SPHERE(neurons="in"), metake=MetaKEConfig())


# ----------------------------------------------------------------------------- the write on a tiny model

TEMPLATES = [["{}"], ["The cat. {}"]]
REQS = [
    SimpleNamespace(case_id=1, subject="France", prompt="The capital of {} is", target_new="Berlin"),
    SimpleNamespace(case_id=2, subject="Toko Yasuda", prompt="{} plays the", target_new="piano"),
]
LAYERS = (1, 2)


@pytest.fixture(scope="module")
def tiny():
    from metake_jax.targets import StageIConfig, optimize_targets

    tok = tiny_tokenizer()
    cfg, params = tiny_model("llama", seed=1)
    b, _ = prepare_batch(tok, REQS, TEMPLATES)
    b = EditBatch(*map(jnp.asarray, b))
    Z = optimize_targets(cfg, params, b, LAYERS[-1], StageIConfig(steps=4, lr=0.5, weight_decay=0.0)).Z
    st = _stats(cfg.d_ff, len(LAYERS), 3)
    return cfg, params, b, Z, st


def _write(tiny, editor):
    from metake_jax.write import multilayer_write
    from models.interface import w_out

    cfg, params, b, Z, st = tiny
    with editor.scope():
        deltas, _ = jax.jit(multilayer_write, static_argnames=("cfg", "layers", "editor"))(
            cfg, params, b, Z, LAYERS, st, editor)
    return np.asarray(deltas), np.asarray(w_out(params, LAYERS))


def test_write_identities_on_a_tiny_model(tiny):
    """keep = 1 → MEMIT; α = 0 → AlphaEdit (bit for bit); RECT/SPHERE = the oracle applied to the write."""
    memit, W = _write(tiny, MEMIT(mom2_update_weight=2.0))
    np.testing.assert_array_equal(_write(tiny, RECT(mom2_update_weight=2.0, keep=1.0))[0], memit)
    np.testing.assert_array_equal(_write(tiny, PRUNE(mom2_update_weight=2.0))[0], memit)  # the stream is MEMIT
    rect, _ = _write(tiny, RECT(mom2_update_weight=2.0))
    want = np.stack([np_rect(memit[j].astype(np.float64), W[j].astype(np.float64), 0.4) for j in range(2)])
    assert np.array_equal(rect != 0, want != 0) and rel(rect, want) <= 1e-6
    ae, _ = _write(tiny, AlphaEdit(l2=1.0))
    np.testing.assert_array_equal(_write(tiny, SPHERE(l2=1.0, alpha=0.0))[0], ae)
    sp, _ = _write(tiny, SPHERE(l2=1.0))
    # layer 1 is written first, on the unedited model: its increment is AlphaEdit's projected
    want1 = np_sphere(ae[0].T.astype(np.float64), W[0].T.astype(np.float64), 0.5, 0.5).T
    assert rel(sp[0], want1) <= 1e-5


def test_registry_has_the_three_editors():
    assert {"rect", "prune", "sphere"} <= set(editors.names())
    assert not editors.get("rect").gated and not editors.get("prune").gated and editors.get("sphere").gated
    assert editors.build("sphere", {"neurons": "in", "alpha": 0.8}) == SPHERE(neurons="in", alpha=0.8)


# ----------------------------------------------------------------------------- layout fact and paper-model presets


@pytest.mark.parametrize("family,want", [("gpt2", "in"), ("gptj", "out"), ("llama", "out")])
def test_sphere_neurons_is_the_family_fact(family, want):
    """HF stores GPT-2's c_proj as Conv1D (d_k, d) and GPT-J/Llama's fc_out/down_proj as Linear (d, d_k)."""
    import importlib

    from metake_jax.editors.sphere import stored_neurons

    cfg, _ = tiny_model(family, seed=0)
    assert stored_neurons(cfg) == want
    SPHERE(neurons=want).check_model(cfg)
    with pytest.raises(ValueError, match=rf"editor\.sphere\.neurons=.*set editor\.sphere\.neurons={want}"):
        SPHERE(neurons="in" if want == "out" else "out").check_model(cfg)
    paper = {"gpt2": "gpt2xl", "gptj": "gptj", "llama": "llama3"}[family]
    assert importlib.import_module(f"configs.{paper}_cf").METHOD_PRESETS["sphere"]["editor.sphere.neurons"] == want


@pytest.mark.parametrize("paper", ["gpt2xl_cf", "gptj_cf", "llama3_cf", "gpt2xl_zsre", "gptj_zsre", "llama3_zsre"])
def test_paper_configs_take_the_method_as_argument(paper):
    import importlib

    mod = importlib.import_module(f"configs.{paper}")
    plain = mod.get_config()
    assert plain.method == "alphaedit" and plain.run_dir == f"runs/{paper}"
    for method, editor in (("rect", "rect"), ("prune", "prune"), ("sphere", "sphere"), ("metake_sphere", "sphere")):
        c = mod.get_config(method)
        assert c.method == method and c.run_dir == f"runs/{paper}_{method}"
        row = mod.METHOD_PRESETS[editor]
        for dotted, value in row.items():
            node = c
            for p in dotted.split("."):
                node = node[p]
            assert node == value
        ed = editors.build(editor, c.editor[editor].to_dict())  # the row builds a valid editor
        assert ed.name == editor
        assert c.stage1 == plain.stage1 and tuple(c.layers) == tuple(plain.layers)  # Stage I as AlphaEdit/MEMIT
    assert mod.get_config("rect").editor.rect.mom2_update_weight == plain.editor.memit.mom2_update_weight
    with pytest.raises(ValueError, match="is not a method"):
        mod.get_config("nope")


def test_metake_lookahead_over_sphere_is_its_write(tiny):
    """One edited layer: the look-ahead Δ_L(Z) = (Z − H_L)·B' with SPHERE's gate B' = B P_s equals
    SPHERE's own write of Z (projection included) — the gate MetaKE freezes is the editor's."""
    from metake_jax.metake import MetaKEConfig, lookahead_increment, prepare_lookahead
    from metake_jax.write import multilayer_write

    cfg, params, b, Z, st = tiny
    one = LayerStats(P=st.P[1:], C0=st.C0[1:], Cp=st.Cp[1:])
    ed = SPHERE(l2=1.0)
    ctx = prepare_lookahead(cfg, params, b, (2,), one, ed, MetaKEConfig())
    got = lookahead_increment(ctx, Z, b.valid)
    want, _ = multilayer_write(cfg, params, b, Z, (2,), one, ed)
    ae, _ = multilayer_write(cfg, params, b, Z, (2,), one, AlphaEdit(l2=1.0))
    assert rel(want[0], ae[0]) > 1e-3  # the projection is active
    assert rel(got, want[0]) <= 1e-4


def test_evaluated_params_read_the_prune_restraint(tiny):
    """The runner's evaluated weights: PRUNE's readout of the stream's kernels (the numpy oracle), the other
    leaves shared; MEMIT's are the stream's own params."""
    from metake_jax.editor import evaluated_params
    from models.interface import w_out, with_w_out

    cfg, params, b, Z, st = tiny
    rng = np.random.default_rng(11)
    W0 = np.asarray(w_out(params, LAYERS), np.float64)
    big = np.stack([3.0 * np.linalg.svd(W0[j], compute_uv=False)[0]
                    * np.outer(rng.normal(size=W0.shape[1]), rng.normal(size=W0.shape[2])) / np.sqrt(W0[j].size)
                    for j in range(len(LAYERS))])
    edited = with_w_out(params, LAYERS, jnp.asarray(big, jnp.float32), add=True)
    assert evaluated_params(edited, params, LAYERS, MEMIT()) is edited
    ev = evaluated_params(edited, params, LAYERS, PRUNE())
    W = np.asarray(w_out(edited, LAYERS), np.float64)
    want = np.stack([np_prune(W[j], W0[j], math.e) for j in range(len(LAYERS))])
    assert rel(np.asarray(w_out(ev, LAYERS)) - W0, want - W0) <= 1e-5
    assert rel(want - W0, W - W0) > 1e-2  # the restraint is active
    np.testing.assert_array_equal(np.asarray(w_out(ev, (0, 3))), np.asarray(w_out(params, (0, 3))))


# ----------------------------------------------------------------------------- the runner


def _tiny_run(tmp_path, name, **over):
    from configs import tiny_cf

    c = tiny_cf.get_config()
    c.batch_size, c.data.n = 2, 4
    c.eval.pre = False
    c.stats.cache_dir = str(tmp_path / "stats")
    c.run_dir = str(tmp_path / name)
    for k, v in over.items():
        node, *rest = k.split(".")
        if rest:
            c[node][rest[0]] = v
        else:
            c[k] = v
    return c


def test_runner_evaluates_and_exports_the_readout_while_the_stream_keeps_its_weights(tmp_path, monkeypatch):
    """PRUNE's wiring: every evaluation (per batch, final) and the HF export see ``readout(W, W0)``; the
    stream and its checkpoints keep W.  The readout is replaced by a known map to make it visible."""
    import models.convert
    from metake_jax import runner
    from models.interface import w_out

    monkeypatch.setattr(PRUNE, "readout", lambda self, W, W0: W0 + 0.5 * (W - W0))
    seen, stream = [], {}
    real_eval = runner.evaluate_cases

    def record_eval(c, kind, cfg, params, *a, **k):
        seen.append(np.asarray(w_out(params, LAYERS)))
        return real_eval(c, kind, cfg, params, *a, **k)

    monkeypatch.setattr(runner, "evaluate_cases", record_eval)
    monkeypatch.setattr(models.convert, "export_hf", lambda path, cfg, params, tok: seen.append(
        np.asarray(w_out(params, LAYERS))) or path)
    hooks = runner.RunHooks(after_checkpoint=lambda done, state: stream.__setitem__(
        done, np.asarray(w_out(state.params, LAYERS))))
    c = _tiny_run(tmp_path, "prune", method="prune", export_hf=str(tmp_path / "hf"))
    c.editor.prune.mom2_update_weight = 10.0
    runner.run(c, hooks=hooks)
    _, params0, _ = runner.load_model_spec(c.model, seed=c.seed)
    W0 = np.asarray(w_out(params0, LAYERS))
    assert np.abs(stream[2] - stream[1]).max() > 0 and np.abs(stream[1] - W0).max() > 0
    assert len(seen) == 4  # batch 1, batch 2, final, export
    for got, W in zip(seen, (stream[1], stream[2], stream[2], stream[2])):
        np.testing.assert_allclose(got, W0 + 0.5 * (W - W0), rtol=0, atol=1e-6)


def test_runner_refuses_sphere_with_the_wrong_layout(tmp_path):
    from metake_jax import runner

    c = _tiny_run(tmp_path, "sphere", method="sphere")
    c.editor.sphere.neurons = "in"
    with pytest.raises(runner.RunError, match=r"editor\.sphere\.neurons='in' does not match the llama family"):
        runner.run(c)


def test_frozen_gate_of_a_projecting_editor_needs_the_kernel():
    from metake_jax.metake import MetaKEConfig, frozen_gate

    st = _stats(8, 1, 0)
    K = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)
    with pytest.raises(ValueError, match="sphere.*W_L"):
        frozen_gate(K, st, SPHERE(), MetaKEConfig())
    np.testing.assert_array_equal(np.asarray(frozen_gate(K, st, AlphaEdit(), MetaKEConfig())),
                                  np.asarray(AlphaEdit().gate(K, 0, st)))
