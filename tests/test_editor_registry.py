"""The editor registry and interface (metake_jax/editors, metake_jax/methods): identities and errors."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from metake_jax import editors
from metake_jax.editors import LayerStats, NotGatedError
from metake_jax.methods import ABLATIONS, methods, resolve


def _stats(d_k: int, m: int, seed: int) -> LayerStats:
    rng = np.random.default_rng(seed)
    P, C0, Cp = [], [], []
    for _ in range(m):
        A = rng.normal(size=(d_k, 3 * d_k))
        c0 = A @ A.T / (3 * d_k)
        _, U = np.linalg.eigh(c0)
        P.append(U[:, : d_k // 2] @ U[:, : d_k // 2].T)
        C0.append(c0)
        B = rng.normal(size=(d_k, 5))
        Cp.append(B @ B.T)
    return LayerStats(*[jnp.asarray(np.stack(x), jnp.float32) for x in (P, C0, Cp)])


def test_every_registered_editor_builds_and_round_trips_its_section():
    for name in editors.names():
        cls = editors.get(name)
        assert cls.name == name and dataclasses.is_dataclass(cls)
        section = editors.default_config()[name]
        ed = editors.build(name, section)
        assert ed == cls() and hash(ed) == hash(cls())  # hashable: a static argument of the jitted write


def test_unknown_editor_and_field_are_named():
    with pytest.raises(ValueError, match="unknown editor 'nope'"):
        editors.get("nope")
    with pytest.raises(ValueError, match=r"editor\.memit\.l3"):
        editors.build("memit", {"l3": 1.0})
    with pytest.raises(ValueError, match=r"editor\.alphaedit\.solve_dtype"):
        editors.build("alphaedit", {"solve_dtype": "float16"})


def test_methods_come_from_the_registry():
    ms = methods()
    for name in editors.names():
        assert resolve(name) == (name, None)
        gated = editors.get(name).gated
        assert (f"metake_{name}" in ms or name == "alphaedit") == gated
    assert resolve("metake").editor == "alphaedit" and resolve("metake").metake == {}
    for a, fields in ABLATIONS.items():
        assert resolve(a).metake == fields
    with pytest.raises(ValueError, match="is not one of"):
        resolve("metake_nope")


@pytest.mark.parametrize("name", [n for n in editors.names() if editors.get(n).gated])
def test_gated_editor_increment_is_residual_times_gate(name):
    """Identity of the interface: for a gated editor, ``increment(K, R) == (R · gate(K))ᵀ`` — the form the
    MetaKE look-ahead freezes (docs/FORMULAS.md §6) — and the same after the write's ``project`` with
    ``project_gate``: ``project(increment(K, R), W) == (R · project_gate(gate(K), W))ᵀ``."""
    d_k, d, n = 12, 7, 4
    rng = np.random.default_rng(1)
    st = _stats(d_k, 2, seed=2)
    K = jnp.asarray(rng.normal(size=(d_k, n)), jnp.float32)
    R = jnp.asarray(rng.normal(size=(d, n)), jnp.float32)
    ed = editors.build(name, {"solve_dtype": "float64"})
    Kb = K + 0.1 * jnp.asarray(rng.normal(size=(d_k, n)), jnp.float32)
    inc, _ = ed.increment(K, R, 1, st, Kb)
    B = ed.gate(K, 1, st, Kb)
    assert B.shape == (n, d_k)
    ref = np.asarray(R, np.float64) @ np.asarray(B, np.float64)
    np.testing.assert_allclose(np.asarray(inc, np.float64), ref.T, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
    W = jnp.asarray(rng.normal(size=(d_k, d)) + 3 * np.outer(rng.normal(size=d_k), rng.normal(size=d)), jnp.float32)
    inc_p = ed.project(inc, W, 1)
    ref_p = np.asarray(R, np.float64) @ np.asarray(ed.project_gate(B, W, 1), np.float64)
    np.testing.assert_allclose(np.asarray(inc_p, np.float64), ref_p.T, rtol=1e-4, atol=1e-6 * np.abs(ref_p).max())


def test_metake_over_an_ungated_editor_is_refused():
    from metake_jax.editor import EditConfig
    from metake_jax.editors.base import Editor
    from metake_jax.metake import MetaKEConfig

    @dataclasses.dataclass(frozen=True)
    class Masked(Editor):  # a post-processing editor whose update is nonlinear in R
        name = "masked"
        gated = False

    with pytest.raises(NotGatedError, match="masked"):
        EditConfig(layers=(1,), editor=Masked(), metake=MetaKEConfig())
    with pytest.raises(NotGatedError):
        Masked().gate(jnp.zeros((3, 2)), 0, _stats(4, 1, 0))


def test_negative_regularizers_and_metake_over_ungated_editors_are_named():
    for name in editors.names():
        for field in editors.get(name).nonnegative:
            with pytest.raises(ValueError, match=rf"editor\.{name}\.{field} must be >= 0"):
                editors.build(name, {field: -1.0})
    for name in editors.names():
        if not editors.get(name).gated:
            with pytest.raises(ValueError, match=rf"'{name}' is not"):
                resolve(f"metake_{name}")
