"""AlphaEdit-BLUE (metake_jax/editors/blue.py; docs/FORMULAS.md §4 "AlphaEdit-BLUE", BASELINES.md §5):
a float64 numpy transcription of its per-layer solve, and identities of the whole batch through
``edit_batch`` on a tiny random model (one layer = AlphaEdit; two layers = two sequential one-layer
AlphaEdit edits; and a numpy re-composition of the two-layer procedure)."""
from __future__ import annotations

from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

from metake_jax import editors
from metake_jax.batch import EditBatch, prepare_batch
from metake_jax.editor import EditConfig, edit_batch, init_state
from metake_jax.editors import LayerStats, NotGatedError
from metake_jax.editors.alphaedit import AlphaEdit
from metake_jax.editors.blue import AlphaEditBLUE
from metake_jax.keys import keys_and_hidden
from metake_jax.metake import MetaKEConfig
from metake_jax.methods import methods
from metake_jax.targets import StageIConfig, optimize_targets
from models.interface import w_out, with_w_out
from tests.tiny import tiny_model, tiny_tokenizer

TEMPLATES = [["{}"], ["The cat. {}"]]
REQS = [
    SimpleNamespace(case_id=1, subject="France", prompt="The capital of {} is", target_new="Berlin"),
    SimpleNamespace(case_id=2, subject="Toko Yasuda", prompt="{} plays the", target_new="piano"),
]
STAGE1 = StageIConfig(steps=4, lr=0.5)
L2 = 0.5
# Not the last layer of the 4-layer model: a δ at the last block's subject token reaches no target logit
# (no attention after it), so Stage I there has a zero NLL gradient and Adam follows round-off.
LAYERS = (1, 2)


def np_alphaedit(K, R, P, Cp, l2):
    """Δᵀ = (R Kᵀ P ((K Kᵀ + C_p) P + λ I)⁻¹)ᵀ in float64 (BASELINES.md §5 step 3)."""
    K, R, P, Cp = (np.asarray(x, np.float64) for x in (K, R, P, Cp))
    return (R @ K.T @ P @ np.linalg.inv((K @ K.T + Cp) @ P + l2 * np.eye(K.shape[0]))).T


def _stats(d_k: int, m: int, seed: int) -> LayerStats:
    """Random projectors P (rank d_k/2) and a non-zero earlier-batch cache C_p per layer."""
    rng = np.random.default_rng(seed)
    P, Cp = [], []
    for _ in range(m):
        U, _ = np.linalg.qr(rng.normal(size=(d_k, d_k)))
        P.append(U[:, : d_k // 2] @ U[:, : d_k // 2].T)
        B = rng.normal(size=(d_k, 4)) * 0.3
        Cp.append(B @ B.T)
    return LayerStats(P=jnp.asarray(np.stack(P), jnp.float32), C0=None, Cp=jnp.asarray(np.stack(Cp), jnp.float32))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def model():
    cfg, params = tiny_model("llama", seed=1)
    return tiny_tokenizer(), cfg, params


def _kernels(params, layers):
    return np.asarray(w_out(params, tuple(layers)), np.float64)


# ----------------------------------------------------------------------------- the editor on its own


@pytest.mark.parametrize("solve_dtype,tol", [("float64", 1e-6), ("float32", 1e-4)])
def test_increment_matches_numpy(solve_dtype, tol):
    d_k, d, n = 16, 6, 3
    rng = np.random.default_rng(0)
    st = _stats(d_k, 2, seed=1)
    K = jnp.asarray(rng.normal(size=(d_k, n)), jnp.float32)
    R = jnp.asarray(rng.normal(size=(d, n)), jnp.float32)
    ed = AlphaEditBLUE(l2=L2, solve_dtype=solve_dtype)
    inc, _ = ed.increment(K, R, 1, st)
    want = np_alphaedit(K, R, st.P[1], st.Cp[1], L2)
    assert inc.shape == (d_k, d)
    assert _rel(inc, want) <= tol


def test_boundary_layers_divisor_and_gate():
    ed = AlphaEditBLUE()
    assert ed.edit_layers((4, 5, 6, 7, 8)) == (4, 8)
    assert ed.edit_layers((13, 14, 15, 16, 17)) == (13, 17)
    assert ed.edit_layers((5,)) == (5,)
    assert AlphaEditBLUE(layers=(3, 6)).edit_layers((4, 5, 6, 7, 8)) == (3, 6)
    for t in range(3):
        assert float(ed.residual_divisor(3, t)) == 1.0
    assert not ed.gated and ed.per_layer_targets
    with pytest.raises(NotGatedError, match="blue"):
        ed.gate(jnp.zeros((4, 2)), 0, _stats(4, 1, 0))
    with pytest.raises(NotGatedError, match="blue"):
        EditConfig(layers=(1, 2), editor=ed, metake=MetaKEConfig())
    assert "blue" in methods() and "metake_blue" not in methods()
    assert editors.build("blue", {"l2": 80.0, "layers": [13, 17]}) == AlphaEditBLUE(l2=80.0, layers=(13, 17))


# ----------------------------------------------------------------------------- identities through edit_batch


def test_one_layer_blue_equals_one_layer_alphaedit(model):
    tok, cfg, params = model
    st = _stats(cfg.d_ff, 1, seed=2)
    out = {}
    for name, ed in (("blue", AlphaEditBLUE(l2=L2)), ("ae", AlphaEdit(l2=L2))):
        state = init_state(params, cfg, (2,), P=st.P)._replace(stats=st)
        out[name], _ = edit_batch(cfg, state, tok, REQS, TEMPLATES, EditConfig(layers=(2,), stage1=STAGE1, editor=ed))
    kb, ka = _kernels(out["blue"].params, (2,)), _kernels(out["ae"].params, (2,))
    k0 = _kernels(params, (2,))
    assert np.linalg.norm(ka - k0) > 0
    assert _rel(kb - k0, ka - k0) <= 1e-6
    assert _rel(out["blue"].stats.Cp, out["ae"].stats.Cp) <= 1e-6


def test_two_layer_blue_equals_two_sequential_one_layer_alphaedit_edits(model):
    """BLUE on (1, 2) = AlphaEdit on (1,) then AlphaEdit on (2,) on the edited model, each with its own
    Stage I at its layer; the C_p of layer 1 is the same because layer 2's write cannot change layer-1 keys."""
    tok, cfg, params = model
    layers = LAYERS
    st = _stats(cfg.d_ff, 2, seed=3)
    state = init_state(params, cfg, layers, P=st.P)._replace(stats=st)
    blue, rep = edit_batch(cfg, state, tok, REQS, TEMPLATES,
                           EditConfig(layers=layers, stage1=STAGE1, editor=AlphaEditBLUE(l2=L2)))
    cur, Cps = params, []
    for j, layer in enumerate(layers):
        sj = LayerStats(P=st.P[j:j + 1], C0=None, Cp=st.Cp[j:j + 1])
        s, _ = edit_batch(cfg, init_state(cur, cfg, (layer,), P=sj.P)._replace(stats=sj), tok, REQS, TEMPLATES,
                          EditConfig(layers=(layer,), stage1=STAGE1, editor=AlphaEdit(l2=L2)))
        cur = s.params
        Cps.append(np.asarray(s.stats.Cp[0]))
    k0 = _kernels(params, layers)
    got, want = _kernels(blue.params, layers) - k0, _kernels(cur, layers) - k0
    for j in range(2):
        assert np.linalg.norm(want[j]) > 0
        assert _rel(got[j], want[j]) <= 1e-6, j
        assert _rel(blue.stats.Cp[j], Cps[j]) <= 1e-6, j
    assert rep.residual_norm.shape[1] == len(REQS)


def test_two_layer_blue_matches_a_numpy_recomposition(model):
    """The BLUE procedure re-composed by hand: per boundary layer, Stage I at that layer on the current
    model, keys/H from one forward pass, the float64 numpy AlphaEdit solve with R undivided, applied;
    then C_p += K Kᵀ with both layers' keys on the final model (BASELINES.md §5 steps 1–4)."""
    tok, cfg, params = model
    layers = LAYERS
    st = _stats(cfg.d_ff, 2, seed=4)
    state = init_state(params, cfg, layers, P=st.P)._replace(stats=st)
    # float64 solve on both sides: the second layer's Stage I runs on the model carrying the first write
    blue, _ = edit_batch(cfg, state, tok, REQS, TEMPLATES,
                         EditConfig(layers=layers, stage1=STAGE1, editor=AlphaEditBLUE(l2=L2, solve_dtype="float64")))
    hb, n = prepare_batch(tok, REQS, TEMPLATES)
    b = EditBatch(*map(jnp.asarray, hb))
    cur = params
    for j, layer in enumerate(layers):
        Z = optimize_targets(cfg, cur, b, layer, STAGE1).Z
        K, H = keys_and_hidden(cfg, cur, b, (layer,))
        R = np.asarray(Z, np.float64) - np.asarray(H, np.float64)  # undivided
        inc = np_alphaedit(K[0], R, st.P[j], st.Cp[j], L2)
        cur = with_w_out(cur, (layer,), jnp.asarray(inc[None], jnp.float32), add=True)
    K, _ = keys_and_hidden(cfg, cur, b, layers)
    K = np.asarray(K, np.float64)
    Cp = np.asarray(st.Cp, np.float64) + np.einsum("mkn,mjn->mkj", K, K)
    k0 = _kernels(params, layers)
    got, want = _kernels(blue.params, layers) - k0, _kernels(cur, layers) - k0
    for j in range(2):
        # float32 model and Stage I on both sides; the float64 solves agree to ~1e-12
        assert np.linalg.norm(want[j]) > 0 and _rel(got[j], want[j]) <= 1e-5, j
    assert _rel(blue.stats.Cp, Cp) <= 1e-5
