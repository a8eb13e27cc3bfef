"""ROME and EMMET (docs/FORMULAS.md §4 "ROME", "EMMET"; BASELINES.md §1, §7): float64 numpy oracles and identities."""
from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metake_jax import editors
from metake_jax.editors import LayerStats
from metake_jax.editors import emmet as EM, memit as ME, rome as RO

D_K, D, N = 24, 10, 5


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def rnd():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(D_K, 3 * D_K))
    C0 = A @ A.T / (3 * D_K)
    K = rng.normal(size=(D_K, N))
    Kb = K + 0.3 * rng.normal(size=(D_K, N))
    R = rng.normal(size=(D, N))
    return dict(C0=C0, K=K, Kb=Kb, R=R)


def x64(fn, *args, **kw):
    """Run ``fn`` on float64 copies of its array arguments in 64-bit mode (the float64 oracle check)."""
    with jax.enable_x64(True):
        args = [jnp.asarray(a, jnp.float64) if isinstance(a, np.ndarray) else a for a in args]
        return np.asarray(fn(*args, **kw))


# ----------------------------------------------------------------------------- numpy transcriptions


def np_rome(K, R, Kb, C0):
    """kmeng01/rome: u = C0⁻¹ k̄ (compute_u), Δ = r uᵀ / (uᵀ k*) (compute_v / rome_main), per request, summed."""
    out = np.zeros((R.shape[0], K.shape[0]))
    for j in range(K.shape[1]):
        u = K[:, j] if C0 is None else np.linalg.inv(C0) @ K[:, j]
        u = u / np.linalg.norm(u)  # the reference normalises u (cancels)
        out += np.outer(R[:, j], u) / (u @ Kb[:, j])
    return out.T


def np_emmet(K, R, C0, lam_c, lam_e, lam_u):
    """UM emmet_main.py: C = λ_C C0 + λ_u I, D = Kᵀ C⁻¹ K (+ λ_E I if n > 1), Δ = R D⁻¹ Kᵀ C⁻¹."""
    C = lam_c * C0 + lam_u * np.eye(K.shape[0])
    Ci = np.linalg.inv(C)
    Dm = K.T @ Ci @ K
    if Dm.shape[0] > 1:
        Dm = Dm + lam_e * np.eye(Dm.shape[0])
    return (R @ np.linalg.inv(Dm) @ K.T @ Ci).T


# ----------------------------------------------------------------------------- ROME


@pytest.mark.parametrize("mom2", [True, False])
def test_rome_matches_numpy_float64(rnd, mom2):
    C0 = rnd["C0"] if mom2 else None
    want = np_rome(rnd["K"], rnd["R"], rnd["Kb"], C0)
    got = x64(RO.rome_increment, rnd["K"], rnd["R"], rnd["Kb"], C0)
    assert got.shape == (D_K, D) and rel(got, want) <= 1e-10
    # float32 inputs, float64 solve
    f = lambda x: None if x is None else jnp.asarray(x, jnp.float32)  # noqa: E731
    got32 = RO.rome_increment(f(rnd["K"]), f(rnd["R"]), f(rnd["Kb"]), f(C0))
    assert got32.dtype == jnp.float32 and rel(got32, want) <= 1e-5


def test_rome_writes_r_at_the_bare_key_and_ignores_padding(rnd):
    """Δ k* = r exactly for one request; zero (padding) columns change nothing and give no NaN."""
    k, kb, r = rnd["K"][:, :1], rnd["Kb"][:, :1], rnd["R"][:, :1]
    inc = x64(RO.rome_increment, k, r, kb, rnd["C0"])
    np.testing.assert_allclose(inc.T @ kb, r, rtol=1e-12, atol=1e-12)
    pad = lambda x: np.concatenate([x, np.zeros((x.shape[0], 2))], axis=1)  # noqa: E731
    inc_p = x64(RO.rome_increment, pad(k), pad(r), pad(kb), rnd["C0"])
    assert np.isfinite(inc_p).all() and rel(inc_p, inc) <= 1e-12
    B = x64(RO.rome_gate, pad(k), pad(kb), rnd["C0"])
    assert np.all(B[1:] == 0)


def test_rome_is_memit_on_one_layer_sherman_morrison(rnd):
    """With k̄ = k* = k: MEMIT r kᵀ(λC0 + kkᵀ)⁻¹ = r(C0⁻¹k)ᵀ/(λ + kᵀC0⁻¹k) = ROME · s/(λ + s), s = kᵀC0⁻¹k;
    so ROME is MEMIT on one layer with λ_C → 0 (the reference's C0 scaling)."""
    k, r, C0 = rnd["K"][:, :1], rnd["R"][:, :1], rnd["C0"]
    s = float(k[:, 0] @ np.linalg.solve(C0, k[:, 0]))
    rome = x64(RO.rome_increment, k, r, None, C0)
    for lam in (15000.0, 1.0, 1e-3):
        memit = x64(ME.memit_increment, k, r, C0, lam)
        assert rel(memit, rome * s / (lam + s)) <= 1e-9
    assert rel(x64(ME.memit_increment, k, r, C0, 1e-6), rome) <= 1e-6  # λ → 0: off by λ/(λ + s)


def test_rome_layer_choice_and_errors():
    assert RO.ROME().edit_layers((4, 5, 6, 7, 8)) == (6,)
    assert RO.ROME().edit_layers((3, 4, 5, 6, 7, 8)) == (5,)  # GPT-J reference layer
    assert RO.ROME(layers=(17,)).edit_layers((13, 14, 15, 16, 17)) == (17,)
    with pytest.raises(ValueError, match=r"editor\.rome\.layers"):
        editors.build("rome", {"layers": (4, 5)})
    with pytest.raises(ValueError, match="K_bare"):
        RO.rome_gate(jnp.ones((4, 2)), jnp.ones((3, 2)))


# ----------------------------------------------------------------------------- EMMET


@pytest.mark.parametrize("lam_c,lam_e,lam_u", [(1.0, 0.1, 0.0), (1000.0, 0.1, 0.0), (3.0, 0.5, 2.0)])
def test_emmet_matches_numpy_float64(rnd, lam_c, lam_e, lam_u):
    want = np_emmet(rnd["K"], rnd["R"], rnd["C0"], lam_c, lam_e, lam_u)
    got = x64(EM.emmet_increment, rnd["K"], rnd["R"], rnd["C0"], lam_c, lam_e, lam_u)
    assert got.shape == (D_K, D) and rel(got, want) <= 1e-9
    f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    got32 = EM.emmet_increment(f(rnd["K"]), f(rnd["R"]), f(rnd["C0"]), lam_c, lam_e, lam_u)
    assert got32.dtype == jnp.float32 and rel(got32, want) <= 1e-4


def test_emmet_one_request_is_rome_closed_form(rnd):
    """n = 1, λ_E = 0 (UM drops λ_E for one request anyway): EMMET = ROME with k̄ = k* = k and C in place of
    C0, and Δ k = r exactly."""
    k, r, C0 = rnd["K"][:, :1], rnd["R"][:, :1], rnd["C0"]
    for lam_e in (0.0, 0.1):
        em = x64(EM.emmet_increment, k, r, C0, 7.0, lam_e, 0.5)
        ro = x64(RO.rome_increment, k, r, k, 7.0 * C0 + 0.5 * np.eye(D_K))
        assert rel(em, ro) <= 1e-10
        np.testing.assert_allclose(em.T @ k, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n", [1, 3])
def test_emmet_padding_columns_change_nothing(rnd, n):
    K, R = rnd["K"][:, :n], rnd["R"][:, :n]
    pad = lambda x: np.concatenate([x[:, :1], np.zeros((x.shape[0], 2)), x[:, 1:]], axis=1)  # noqa: E731
    a = x64(EM.emmet_increment, K, R, rnd["C0"], 1.0, 0.1, 0.0)
    b = x64(EM.emmet_increment, pad(K), pad(R), rnd["C0"], 1.0, 0.1, 0.0)
    assert np.isfinite(b).all() and rel(b, a) <= 1e-12
    B = x64(EM.emmet_gate, pad(K), rnd["C0"], 1.0, 0.1, 0.0)
    assert np.all(B[1:3] == 0)


def test_emmet_gate_and_field_errors(rnd):
    C0 = rnd["C0"]
    B = x64(EM.emmet_gate, rnd["K"], C0, 2.0, 0.1, 0.3)
    want = np_emmet(rnd["K"], np.eye(N), C0, 2.0, 0.1, 0.3).T  # R = I gives the gate
    assert B.shape == (N, D_K) and rel(B, want) <= 1e-10
    with pytest.raises(ValueError, match=r"editor\.emmet\.emmet_lambda"):
        editors.build("emmet", {"emmet_lambda": -1.0})
    with pytest.raises(ValueError, match="C = 0"):
        editors.build("emmet", {"mom2_update_weight": 0.0})


# ----------------------------------------------------------------------------- through the model


TEMPLATES = [["{}"], ["The cat. {}", "A dog. {}"]]
REQS = [
    SimpleNamespace(case_id=1, subject="France", prompt="The capital of {} is", target_new="Berlin"),
    SimpleNamespace(case_id=2, subject="Toko Yasuda", prompt="{} plays the", target_new="piano"),
]


def _c0(d_k, m, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(m, d_k, 4 * d_k))
    return jnp.asarray(np.einsum("mkr,mjr->mkj", A, A) / (4 * d_k), jnp.float32)


def test_rome_edit_reaches_the_target_on_a_tiny_model():
    """One request through ``edit_batch``: ROME writes Δ k* = r at its one layer, so the edited model's
    block output at the bare prompt equals the Stage I target z (keys of that layer are unchanged);
    two requests are written one at a time into that layer only (rank ≤ 2)."""
    from metake_jax.batch import EditBatch, prepare_batch
    from metake_jax.editor import EditConfig, edit_batch, init_state
    from metake_jax.keys import keys_and_hidden
    from metake_jax.targets import StageIConfig, optimize_targets
    from tests.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    cfg, params = tiny_model("llama", seed=1)
    ed = RO.ROME()
    layers = ed.edit_layers((1, 2, 3))
    assert layers == (2,)
    s1 = StageIConfig(steps=3, lr=0.5)
    state = init_state(params, cfg, layers, C0=_c0(cfg.d_ff, 1))
    ecfg = EditConfig(layers=layers, stage1=s1, editor=ed)
    new, rep = edit_batch(cfg, state, tok, REQS[:1], TEMPLATES, ecfg)
    b, _ = prepare_batch(tok, REQS[:1], TEMPLATES)
    b = EditBatch(*map(jnp.asarray, b))
    assert ecfg.stage1.norm_ref == "mlp"  # ROME's Stage I convention, resolved from "auto"
    Z = optimize_targets(cfg, params, b, layers[-1], ecfg.stage1).Z
    _, H = keys_and_hidden(cfg, new.params, b, layers)
    _, H0 = keys_and_hidden(cfg, params, b, layers)
    assert rel(H - H0, Z - H0) <= 1e-4

    new2, rep2 = edit_batch(cfg, state, tok, REQS, TEMPLATES, ecfg)
    k0 = np.asarray(params["layers"]["mlp"]["fc_out"]["kernel"], np.float64)
    dk = np.asarray(new2.params["layers"]["mlp"]["fc_out"]["kernel"], np.float64) - k0
    assert np.abs(dk[[0, 1, 3]]).max() == 0 and np.abs(dk[2]).max() > 0
    assert np.linalg.matrix_rank(dk[2], tol=1e-6 * np.abs(dk[2]).max()) == 2
    assert rep2.stage1_steps.shape == (2,) and new2.n_edits == 2


# ----------------------------------------------------------------------------- paper-model presets

SPEC = {  # BASELINES.md §1 (ROME) and §7 (EMMET; Llama-3: the UM Llama-2 file): layer, steps, clamp, wd, extra
    "gpt2xl": {"rome": (17, 20, 4.0, 0.5, {"mom2_adjustment": True}),
               "emmet": (17, 20, 0.75, 0.5, {"mom2_update_weight": 1000.0, "emmet_lambda": 0.1})},
    "gptj": {"rome": (5, 20, 4.0, 0.5, {"mom2_adjustment": True}),
             "emmet": (5, 25, 0.75, 0.5, {"mom2_update_weight": 1.0, "emmet_lambda": 0.1})},
    "llama3": {"rome": (5, 25, 4.0, 1e-3, {"mom2_adjustment": False}),
               "emmet": (5, 25, 4.0, 1e-3, {"mom2_update_weight": 1.0, "emmet_lambda": 0.1})},
}


@pytest.mark.parametrize("model", sorted(SPEC))
@pytest.mark.parametrize("data", ["cf", "zsre"])
def test_paper_configs_take_the_method_as_argument(model, data):
    import importlib

    from metake_jax import runner

    mod = importlib.import_module(f"configs.{model}_{data}")
    plain = mod.get_config()
    assert plain.method == "alphaedit" and plain.to_dict() == mod.get_config("").to_dict()
    for method, (layer, steps, clamp, wd, extra) in SPEC[model].items():
        for m in (method, f"metake_{method}"):
            c = mod.get_config(m)
            ecfg = runner.edit_config(c)
            assert c.method == m and ecfg.editor.name == method and ecfg.layers == (layer,)
            assert (c.stage1.lr, c.stage1.steps, c.stage1.clamp_norm_factor, c.stage1.weight_decay) == (0.5, steps, clamp, wd)
            assert all(getattr(ecfg.editor, k) == v for k, v in extra.items())
            assert c.run_dir.endswith(m) and tuple(c.layers) == tuple(plain.layers)
    with pytest.raises(ValueError, match="'nope' is not a method"):
        mod.get_config("nope")


@pytest.mark.parametrize("method,over,written", [("rome", {}, (1,)), ("emmet", {"layers": (2,)}, (2,)),
                                                 ("emmet", {}, (1, 2))])
def test_runner_writes_only_the_editors_layers(tmp_path, method, over, written):
    """The runner's statistics, state and writes follow the editor's own layers (ROME: one; an editor's
    ``layers`` field), through ``runner.run`` on the tiny random model."""
    from configs import tiny_cf
    from metake_jax import runner

    c = tiny_cf.get_config()
    c.method, c.batch_size, c.data.n = method, 2, 2
    c.eval.pre = c.eval.final = c.eval.batch = False
    c.stats.cache_dir, c.run_dir = str(tmp_path / "stats"), str(tmp_path / "run")
    for k, v in over.items():
        c.editor[method][k] = v
    got = {}
    hook = lambda done, state: got.update(k=np.asarray(state.params["layers"]["mlp"]["fc_out"]["kernel"]),  # noqa: E731
                                          Cp=np.asarray(state.stats.Cp))
    cfg, params, _ = runner.load_model_spec(c.model, seed=int(c.seed))
    runner.run(c, hooks=runner.RunHooks(after_checkpoint=hook))
    k0 = np.asarray(params["layers"]["mlp"]["fc_out"]["kernel"])
    changed = tuple(int(l) for l in np.nonzero(np.abs(got["k"] - k0).reshape(k0.shape[0], -1).max(1) > 0)[0])
    assert changed == written and got["Cp"].shape[0] == len(written)


@pytest.mark.parametrize("name", ["rome", "emmet"])
def test_metake_over_rome_and_emmet(name):
    """MetaKE over the new gated editors (docs/FORMULAS.md §6): the look-ahead runs on the frozen gate B,
    the batch's ℓ_meta never rises (Armijo, line_search="batch"), and only the editor's layer is written."""
    from metake_jax.editor import EditConfig, edit_batch, init_state
    from metake_jax.metake import MetaKEConfig
    from metake_jax.targets import StageIConfig
    from tests.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    cfg, params = tiny_model("llama", seed=1)
    ed = editors.build(name, {"layers": (2,)})
    state = init_state(params, cfg, (2,), C0=_c0(cfg.d_ff, 1, seed=4))
    ecfg = EditConfig(layers=(2,), stage1=StageIConfig(steps=3, lr=0.5), editor=ed,
                      metake=MetaKEConfig(steps=2, lr=0.5))
    new, rep = edit_batch(cfg, state, tok, REQS, TEMPLATES, ecfg)
    path = rep.meta_losses.sum(axis=-1) if name == "emmet" else rep.meta_losses  # ROME: one request per write
    assert np.isfinite(rep.meta_losses).all() and np.all(np.diff(path, axis=0) <= 1e-6 * np.abs(path).max())
    k0 = np.asarray(params["layers"]["mlp"]["fc_out"]["kernel"])
    dk = np.abs(np.asarray(new.params["layers"]["mlp"]["fc_out"]["kernel"]) - k0).reshape(k0.shape[0], -1).max(1)
    assert dk[2] > 0 and np.all(dk[[0, 1, 3]] == 0)


# ----------------------------------------------------------------------------- ROME's context templates


def test_rome_templates_21_of_two_lengths():
    """templates.lengths = (5, 10), n_per_prompt = 2 (the ROME presets): "{}" + 10 templates of 5 tokens + 10 of
    10 tokens (kmeng01/rome context_template_length_params [[5, 10], [10, 10]]); token counts by the tokenizer."""
    from metake_jax.templates import SEED_WORDS, context_templates
    from tests.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    cfg, params = tiny_model("gptj")
    # the LM head favours four whole-word tokens (" the", " is", " of", " and"): every sample is then a
    # sequence of whole words, which the tokenizer splits back into exactly the sampled tokens
    words = [tok(w)["input_ids"] for w in (" the", " is", " of", " and")]
    assert all(len(w) == 1 for w in words)
    bias = params["lm_head"]["bias"].at[jnp.array([w[0] for w in words])].add(50.0)
    params = {**params, "lm_head": {**params["lm_head"], "bias": bias}}
    tpl = context_templates(cfg, params, tok, seed=0, n_per_prompt=2, lengths=(5, 10))
    assert [len(g) for g in tpl] == [1, 10, 10] and tpl[0] == ["{}"]
    assert sum(len(g) for g in tpl) == 21
    for n_tok, group in zip((5, 10), tpl[1:]):
        for j, t in enumerate(group):
            assert t.endswith(". {}") and t.startswith(SEED_WORDS[j // 2])
            seed_len = len(tok(SEED_WORDS[j // 2])["input_ids"])  # max_out_len counts the seed word's tokens
            assert len(tok(t[: -len(". {}")])["input_ids"]) == max(n_tok, seed_len), t
    # the groups are sampled apart: a 5-token template is not just the start of its 10-token counterpart
    assert any(not t10.startswith(t5[: -len(". {}")]) for t5, t10 in zip(tpl[1], tpl[2]))
    # a single length is what it always was; a bad length names itself
    assert context_templates(cfg, params, tok, seed=0, n_per_prompt=2, lengths=(10,)) == \
        context_templates(cfg, params, tok, seed=0, n_per_prompt=2, length=10)
    with pytest.raises(ValueError, match="lengths"):
        context_templates(cfg, params, tok, lengths=(5, 0))


def test_rome_presets_select_reference_stage1_and_templates():
    """``--config=configs/<paper model>_cf.py:rome`` (and metake_rome, and ``--config.method=rome`` on any config)
    gets ROME's Stage I norm reference ("mlp") and the 21-template set; MEMIT keeps "block"."""
    import importlib

    from metake_jax.run_config import RunConfig
    from metake_jax.runner import _fingerprint, edit_config

    for name in ("gpt2xl_cf", "gptj_cf", "llama3_cf"):
        mod = importlib.import_module(f"configs.{name}")
        for method in ("rome", "metake_rome"):
            rc = RunConfig.of(mod.get_config(method))
            assert edit_config(rc).stage1.norm_ref == "mlp"
            assert (rc.templates.lengths, rc.templates.n_per_prompt) == ((5, 10), 2)
            assert _fingerprint(rc)["stage1"]["norm_ref"] == "mlp"
        assert edit_config(mod.get_config("memit")).stage1.norm_ref == "block"
        assert "norm_ref" not in _fingerprint(mod.get_config("memit"))["stage1"]  # older checkpoints still resume
    base = importlib.import_module("configs.smollm2_cf").get_config()
    base.method = "rome"
    assert edit_config(base).stage1.norm_ref == "mlp"
