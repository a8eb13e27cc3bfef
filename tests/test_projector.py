"""Null-space projector (docs/FORMULAS.md §4, §R5) against a known spectrum and numpy."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from metake_jax.projector import kept_mask, nullspace_projector, projector_rank, projectors_for_layers

ROOT = Path(__file__).resolve().parents[1]
D_K = 40


def psd_with_spectrum(ev, seed=0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(len(ev), len(ev))))
    return (Q * ev) @ Q.T, Q


def davis_kahan_tol(ev, k):
    """Bound on max |P - P_ref| for the float32 projector onto the k smallest eigenvectors of C.

    Davis–Kahan sin θ: ‖P − P_ref‖₂ ≤ ‖ΔC‖₂ / gap, with gap = λ_(k+1) − λ_(k) the eigen-gap at the
    cut and ‖ΔC‖₂ ≈ eps₃₂·‖C‖₂ the backward error of a float32 eigendecomposition (the float32 cast
    of C alone is of that size); max-abs entries are ≤ the 2-norm.  A fixed 1e-5 failed on a clean
    machine for energy = 0.99, whose cut falls in a gap of 7e-4 (bound 5e-4, error seen 1.15e-5).
    """
    es = np.sort(np.asarray(ev, np.float64))
    return float(np.finfo(np.float32).eps * es[-1] / (es[k] - es[k - 1]))


def spectrum(n_small, seed=0):
    """n_small eigenvalues well below 2e-2, the rest well above (ranks are unambiguous)."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.uniform(1e-5, 1e-2, n_small), rng.uniform(5e-2, 3.0, D_K - n_small)])


@pytest.mark.parametrize("n_small", [7, 23])
def test_threshold_projector(n_small):
    ev = spectrum(n_small, seed=n_small)
    C0, Q = psd_with_spectrum(ev, seed=n_small)
    P, rank = nullspace_projector(C0.astype(np.float32), threshold=2e-2, return_rank=True)
    P = np.asarray(P, np.float64)
    assert int(rank) == n_small == int(np.sum(ev < 2e-2))
    assert projector_rank(C0.astype(np.float32), threshold=2e-2) == n_small
    assert np.abs(P - P.T).max() <= 1e-6
    assert np.abs(P @ P - P).max() <= 1e-5
    assert np.trace(P) == pytest.approx(n_small, abs=1e-4)
    # oracle: the projector onto the known eigenvectors of the small eigenvalues
    small = Q[:, ev < 2e-2]
    assert np.abs(P - small @ small.T).max() <= davis_kahan_tol(ev, n_small)
    # preserved keys (large-eigenvalue directions) are annihilated
    big = Q[:, ev >= 2e-2]
    assert np.linalg.norm(P @ big) <= 1e-5 * np.linalg.norm(big)


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_energy_projector(energy):
    rng = np.random.default_rng(3)
    ev = np.sort(rng.exponential(1.0, D_K)) * rng.choice([1e-3, 1.0], D_K)
    C0, Q = psd_with_spectrum(ev, seed=4)
    order = np.argsort(ev)
    cum = np.cumsum(ev[order])
    k = int(np.sum(cum <= (1 - energy) * ev.sum()))  # rule of the module docstring, float64
    P, rank = nullspace_projector(C0.astype(np.float32), energy=energy, return_rank=True)
    assert int(rank) == k
    keep = Q[:, order[:k]]
    assert np.abs(np.asarray(P, np.float64) - keep @ keep.T).max() <= davis_kahan_tol(ev, k)
    # the removed directions carry at least `energy` of the eigenvalue mass
    assert ev[order[k:]].sum() >= energy * ev.sum() - 1e-9


def test_kept_mask_rules():
    ev = np.array([-1e-7, 1e-3, 0.019, 0.021, 0.5, 1.5], np.float32)
    assert np.asarray(kept_mask(ev, threshold=2e-2)).tolist() == [True, True, True, False, False, False]
    # total (clipped) = 2.041; 1 - 0.9 -> 0.2041: keeps 1e-3+0.019+0.021 = 0.041, not +0.5
    assert np.asarray(kept_mask(ev, energy=0.9)).tolist() == [True, True, True, True, False, False]


def test_rank_zero_and_full_warn():
    C0, _ = psd_with_spectrum(spectrum(10), seed=5)
    with pytest.warns(RuntimeWarning, match="layer 3.*rank 0"):
        P = nullspace_projector(C0.astype(np.float32), threshold=1e-9, layer=3)
    assert np.abs(np.asarray(P)).max() == 0
    with pytest.warns(RuntimeWarning, match="full rank"):
        P = nullspace_projector(C0.astype(np.float32), threshold=1e9)
    assert np.abs(np.asarray(P) - np.eye(D_K)).max() <= 1e-5
    with pytest.raises(ValueError, match="energy"):
        nullspace_projector(C0.astype(np.float32), energy=1.5)


def _stack(m=5):
    mats = [psd_with_spectrum(spectrum(5 + 3 * i, seed=i), seed=10 + i)[0] for i in range(m)]
    return np.stack(mats).astype(np.float32)


def test_layers_one_device_equals_per_layer():
    C = _stack()
    P, ranks = projectors_for_layers(C, threshold=2e-2, layers=(4, 5, 6, 7, 8))
    assert P.shape == C.shape
    for i in range(len(C)):
        Pi, ri = nullspace_projector(C[i], return_rank=True)
        assert ranks[i] == int(ri) == 5 + 3 * i
        assert np.abs(np.asarray(P[i]) - np.asarray(Pi)).max() <= 1e-6


_SCRIPT = textwrap.dedent("""
    import os, sys, json
    import numpy as np
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    from metake_jax.projector import projectors_for_layers
    from metake_jax.sharding import make_mesh
    C = np.load(sys.argv[1])["C"]
    mesh = make_mesh()
    P, ranks = projectors_for_layers(C, threshold=2e-2, mesh=mesh)
    np.savez(sys.argv[2], P=np.asarray(P), ranks=ranks)
    print(json.dumps({"devices": jax.device_count(), "mesh": int(mesh.shape["data"])}))
""")


def run_on_8_devices(script: str, *args: str) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_layers_sharded_8_devices_equal_one_device(tmp_path):
    C = _stack(5)  # 5 layers on 8 devices: padding exercised
    np.savez(tmp_path / "in.npz", C=C)
    info = run_on_8_devices(_SCRIPT, str(tmp_path / "in.npz"), str(tmp_path / "out.npz"))
    assert info == {"devices": 8, "mesh": 8}
    got = np.load(tmp_path / "out.npz")
    P1, r1 = projectors_for_layers(C, threshold=2e-2)
    assert got["P"].shape == C.shape
    np.testing.assert_array_equal(got["ranks"], r1)
    assert np.abs(got["P"] - np.asarray(P1)).max() <= 1e-5
