"""Closed-form editors, gates and association (docs/FORMULAS.md §4–§6) against float64 numpy and identities."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metake_jax.editors import alphaedit as AE, linalg as LA, memit as ME
from metake_jax.errors import EditError, IllConditionedError

D_K, D, N, N_NULL = 32, 12, 6, 10
L2 = 10.0


def f32(x):
    return jnp.asarray(np.asarray(x, np.float64), jnp.float32)


def f64(x):
    """float64 copy of exactly the float32 values the JAX code sees."""
    return np.asarray(np.asarray(x, np.float32), np.float64)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.fixture(scope="module")
def setup():
    """C0 with a known spectrum: N_NULL eigenvalues << 2e-2 (the null space), the rest >> 2e-2."""
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.normal(size=(D_K, D_K)))
    ev = np.concatenate([rng.uniform(1e-4, 5e-3, N_NULL), rng.uniform(0.3, 2.0, D_K - N_NULL)])
    C0 = (Q * ev) @ Q.T
    P = Q[:, :N_NULL] @ Q[:, :N_NULL].T  # exact projector onto the small-eigenvalue subspace
    K = rng.normal(size=(D_K, N))
    R = rng.normal(size=(D, N))
    Kp = rng.normal(size=(D_K, 20)) * 0.7
    Cp = Kp @ Kp.T
    C_well = (Q * rng.uniform(0.5, 2.0, D_K)) @ Q.T  # well-conditioned C0 for the float32 MEMIT path
    return dict(Q=Q, C0=C0, P=P, K=K, R=R, Cp=Cp, C_well=C_well)


# ----------------------------------------------------------------------------- numpy oracles (docs/FORMULAS.md §4)


def np_memit(K, R, C0, lam, Cp=None):
    A = lam * C0 + K @ K.T + (0 if Cp is None else Cp)
    return (R @ K.T @ np.linalg.inv(A)).T


def np_alphaedit(K, R, P, Cp, l2):
    M = K @ K.T + (0 if Cp is None else Cp)
    return (R @ K.T @ P @ np.linalg.inv(M @ P + l2 * np.eye(K.shape[0]))).T


# ----------------------------------------------------------------------------- MEMIT


@pytest.mark.parametrize("with_cp", [False, True])
def test_memit_float32_matches_numpy(setup, with_cp):
    s = setup
    Cp = s["Cp"] if with_cp else None
    got = ME.memit_increment(f32(s["K"]), f32(s["R"]), f32(s["C_well"]), 5.0,
                            None if Cp is None else f32(Cp), solve_dtype=jnp.float32)
    want = np_memit(f64(s["K"]), f64(s["R"]), f64(s["C_well"]), 5.0, None if Cp is None else f64(Cp))
    assert got.shape == (D_K, D) and got.dtype == jnp.float32
    assert rel(got, want) <= 1e-5


def test_memit_seq_is_memit_with_cache(setup):
    s = setup
    a = ME.memit_seq_increment(f32(s["K"]), f32(s["R"]), f32(s["C_well"]), 5.0, f32(s["Cp"]),
                              solve_dtype=jnp.float32)
    want = np_memit(f64(s["K"]), f64(s["R"]), f64(s["C_well"]), 5.0, f64(s["Cp"]))
    assert rel(a, want) <= 1e-5


def test_memit_float64_solve_on_ill_conditioned_system(setup):
    """λ_C = 15000 with eigenvalues down to 1e-4: float32 loses digits, the float64 path must not."""
    s = setup
    args = (f32(s["K"]), f32(s["R"]), f32(s["C0"]), 15000.0)
    want = np_memit(f64(s["K"]), f64(s["R"]), f64(s["C0"]), 15000.0)
    got64, diag = ME.memit_increment(*args, solve_dtype=jnp.float64, return_diagnostics=True)
    assert got64.dtype == jnp.float32
    assert rel(got64, want) <= 1e-6
    assert float(diag.eps) < 1e-15  # really solved in float64
    assert not jax.config.jax_enable_x64  # the local x64 scope did not leak


def test_memit_float64_under_jit_needs_x64(setup):
    s = setup
    fn = jax.jit(lambda K, R, C: ME.memit_increment(K, R, C, 15000.0, solve_dtype=jnp.float64))
    args = (f32(s["K"]), f32(s["R"]), f32(s["C0"]))
    with pytest.raises(ValueError, match="enable_x64"):
        fn(*args)
    with jax.enable_x64(True):
        got = fn(*args)
    want = np_memit(f64(s["K"]), f64(s["R"]), f64(s["C0"]), 15000.0)
    assert rel(got, want) <= 1e-6


# ----------------------------------------------------------------------------- AlphaEdit


@pytest.mark.parametrize("with_cp", [False, True])
def test_alphaedit_matches_numpy(setup, with_cp):
    s = setup
    Cp = s["Cp"] if with_cp else None
    got = AE.alphaedit_increment(f32(s["K"]), f32(s["R"]), f32(s["P"]), None if Cp is None else f32(Cp), L2)
    want = np_alphaedit(f64(s["K"]), f64(s["R"]), f64(s["P"]), None if Cp is None else f64(Cp), L2)
    assert got.shape == (D_K, D)
    assert rel(got, want) <= 1e-5


@pytest.mark.parametrize("with_cp", [False, True])
def test_alphaedit_preserves_null_space_keys(setup, with_cp):
    """Δ K0 = 0 for keys K0 with P K0 = 0 (docs/FORMULAS.md §R5 identity (i))."""
    s = setup
    Cp = f32(s["Cp"]) if with_cp else None
    inc = AE.alphaedit_increment(f32(s["K"]), f32(s["R"]), f32(s["P"]), Cp, L2)
    rng = np.random.default_rng(1)
    K0 = (np.eye(D_K) - s["P"]) @ rng.normal(size=(D_K, 50))
    assert np.abs(s["P"] @ K0).max() < 1e-12
    delta = np.asarray(inc, np.float64).T  # (d, d_k): Δ in the out×in layout
    ratio = np.linalg.norm(delta @ K0) / (np.linalg.norm(delta) * np.linalg.norm(K0))
    assert ratio <= 1e-4
    # ... while the edited keys do move (the ratio above is not small by accident)
    moved = np.linalg.norm(delta @ s["K"]) / (np.linalg.norm(delta) * np.linalg.norm(s["K"]))
    assert moved > 1e-2


@pytest.mark.parametrize("with_cp", [False, True])
def test_realized_change_is_residual_times_interaction(setup, with_cp):
    """Δ K = R M with M = Kᵀ P ((KKᵀ+C_p)P + λI)⁻¹ K (docs/FORMULAS.md §5); M is a shrinkage (eig in [0,1))."""
    s = setup
    Cp = f32(s["Cp"]) if with_cp else None
    K, R, P = f32(s["K"]), f32(s["R"]), f32(s["P"])
    inc = AE.alphaedit_increment(K, R, P, Cp, L2)
    M = AE.interaction_matrix(K, P, Cp, L2)
    assert M.shape == (N, N)
    realized = np.asarray(inc, np.float64).T @ f64(s["K"])
    assert rel(realized, f64(s["R"]) @ np.asarray(M, np.float64)) <= 1e-5
    Mn = np.asarray(M, np.float64)
    ev = np.linalg.eigvalsh(0.5 * (Mn + Mn.T))
    assert ev.min() >= -1e-6 and ev.max() < 1.0
    # independent oracle for M
    Kd, Pd = f64(s["K"]), f64(s["P"])
    Mm = Kd @ Kd.T + (0 if Cp is None else f64(s["Cp"]))
    want = Kd.T @ Pd @ np.linalg.inv(Mm @ Pd + L2 * np.eye(D_K)) @ Kd
    assert rel(M, want) <= 1e-5


def test_memit_realized_change(setup):
    s = setup
    K, R, C = f32(s["K"]), f32(s["R"]), f32(s["C_well"])
    inc = ME.memit_increment(K, R, C, 5.0)
    M = ME.memit_interaction_matrix(K, C, 5.0)
    realized = np.asarray(inc, np.float64).T @ f64(s["K"])
    assert rel(realized, f64(s["R"]) @ np.asarray(M, np.float64)) <= 1e-5


@pytest.mark.parametrize("with_cp", [False, True])
def test_single_request_association(setup, with_cp):
    """α = β/(1+β) ∈ [0,1) equals ‖Δk‖/‖r‖ for a lone request (docs/FORMULAS.md §5, Proposition 1)."""
    s = setup
    Cp = f32(s["Cp"]) if with_cp else None
    K, P = f32(s["K"]), f32(s["P"])
    alpha = np.asarray(AE.association(K, P, Cp, L2))
    assert alpha.shape == (N,)
    assert np.all(alpha >= 0) and np.all(alpha < 1)
    assert alpha.max() > 0.05  # not trivially zero
    for i in range(N):
        k, r = K[:, i:i + 1], f32(s["R"])[:, i:i + 1]
        inc = AE.alphaedit_increment(k, r, P, Cp, L2)
        realized = np.asarray(inc, np.float64).T @ f64(k)
        assert np.linalg.norm(realized) / np.linalg.norm(f64(r)) == pytest.approx(alpha[i], rel=1e-5)
        # and Δk is parallel to r
        cos = float((realized.ravel() @ f64(r).ravel()) / (np.linalg.norm(realized) * np.linalg.norm(f64(r))))
        assert cos == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("with_cp", [False, True])
def test_memit_single_request_association(setup, with_cp):
    s = setup
    Cp = f32(s["Cp"]) if with_cp else None
    K, C = f32(s["K"]), f32(s["C_well"])
    alpha = np.asarray(ME.memit_association(K, C, 5.0, Cp))
    assert np.all(alpha >= 0) and np.all(alpha < 1)
    for i in range(N):
        k, r = K[:, i:i + 1], f32(s["R"])[:, i:i + 1]
        inc = ME.memit_increment(k, r, C, 5.0, Cp)
        realized = np.asarray(inc, np.float64).T @ f64(k)
        assert np.linalg.norm(realized) / np.linalg.norm(f64(r)) == pytest.approx(alpha[i], rel=1e-5)


# ----------------------------------------------------------------------------- gates (docs/FORMULAS.md §6)


@pytest.mark.parametrize("with_cp", [False, True])
def test_alphaedit_gate_reproduces_increment(setup, with_cp):
    s = setup
    Cp = f32(s["Cp"]) if with_cp else None
    K, R, P = f32(s["K"]), f32(s["R"]), f32(s["P"])
    G = AE.alphaedit_gate(K, P, Cp, L2)
    Mm = f64(s["K"]) @ f64(s["K"]).T + (0 if Cp is None else f64(s["Cp"]))
    want_G = f64(s["P"]) @ np.linalg.inv(Mm @ f64(s["P"]) + L2 * np.eye(D_K))
    assert rel(G, want_G) <= 1e-5
    assert rel(LA.increment_from_gate(K, R, G), AE.alphaedit_increment(K, R, P, Cp, L2)) <= 1e-5


def test_memit_and_keyonly_gates(setup):
    s = setup
    K, R, C = f32(s["K"]), f32(s["R"]), f32(s["C_well"])
    G = ME.memit_gate(K, C, 5.0, f32(s["Cp"]))
    want = np.linalg.inv(5.0 * f64(s["C_well"]) + f64(s["Cp"]) + f64(s["K"]) @ f64(s["K"]).T)
    assert rel(G, want) <= 1e-6
    assert rel(LA.increment_from_gate(K, R, G), ME.memit_increment(K, R, C, 5.0, f32(s["Cp"]))) <= 1e-5
    Gk = LA.keyonly_gate(K, L2)
    assert rel(Gk, np.linalg.inv(f64(s["K"]) @ f64(s["K"]).T + L2 * np.eye(D_K))) <= 1e-5


def test_increment_from_gate_is_differentiable(setup):
    """jax.grad through Δ(Z) = (Z−H)KᵀG (the MetaKE look-ahead) equals the analytic gradient."""
    s = setup
    K, P = f32(s["K"]), f32(s["P"])
    G = AE.alphaedit_gate(K, P, f32(s["Cp"]), L2)
    W = f32(np.random.default_rng(2).normal(size=(D_K, D)))
    g = jax.grad(lambda R: jnp.sum(LA.increment_from_gate(K, R, G) * W))(f32(s["R"]))
    # d/dR Σ (Gᵀ K Rᵀ) ⊙ W = (Wᵀ Gᵀ K)ᵀ... = Wᵀ (Gᵀ K) -> (d, n)
    want = f64(np.asarray(W)).T @ (np.asarray(G, np.float64).T @ f64(s["K"]))
    assert rel(g, want) <= 1e-5


# ----------------------------------------------------------------------------- checks


def test_shape_errors(setup):
    s = setup
    with pytest.raises(ValueError, match="number of requests"):
        AE.alphaedit_increment(f32(s["K"]), f32(s["R"][:, :3]), f32(s["P"]), None, L2)
    with pytest.raises(AssertionError, match="d_k"):
        AE.alphaedit_increment(f32(s["K"]), f32(s["R"]), f32(s["P"][:5, :5]), None, L2)


def test_non_finite_increment_refused(setup):
    s = setup
    inc = AE.alphaedit_increment(f32(s["K"]), f32(s["R"]), f32(s["P"]), None, L2)
    LA.check_finite(inc, 7)  # finite: no error
    bad = inc.at[3, 4].set(jnp.nan).at[0, 0].set(jnp.inf)
    with pytest.raises(EditError, match="layer 7.*2 non-finite"):
        LA.check_finite(bad, 7)


def test_ill_conditioned_solve_reported(setup):
    """MEMIT in float32 with a rank-deficient C0: A = λC0 + KKᵀ is singular -> IllConditionedError;
    a well-conditioned system and the float64 solve of the same data pass."""
    s = setup
    Q = s["Q"]
    ev = np.zeros(D_K)
    ev[:10] = 1.0
    C_sing = (Q * ev) @ Q.T
    K, R = f32(s["K"]), f32(s["R"])
    _, diag = ME.memit_increment(K, R, f32(C_sing), 100.0, solve_dtype=jnp.float32, return_diagnostics=True)
    with pytest.raises(IllConditionedError, match="layer 4"):
        LA.check_solve(diag, 4)
    _, ok = ME.memit_increment(K, R, f32(s["C_well"]), 5.0, solve_dtype=jnp.float32, return_diagnostics=True)
    LA.check_solve(ok, 4)
    _, ok_ae = AE.alphaedit_increment(K, R, f32(s["P"]), f32(s["Cp"]), L2, return_diagnostics=True)
    LA.check_solve(ok_ae, 4)
    nan_diag = LA.SolveDiagnostics(jnp.float32(jnp.nan), jnp.float32(1.0), jnp.float32(1e-7))
    with pytest.raises(IllConditionedError, match="layer 2"):
        LA.check_solve(nan_diag, 2)
