"""SPHERE over AlphaEdit (docs/FORMULAS.md §B6; BASELINES.md §6 — SP ``AlphaEdit/AlphaEdit_main.py``,
``project_B_into_soft_dirs``).

Each layer's AlphaEdit increment is multiplied by the soft projector of the layer's current weight
(before this batch; it carries the earlier batches' edits), computed in the reference's **stored** layout:

    A    = the weight as HF stores it, rows = its "neurons";  Â = A with unit-norm rows (+1e-8)
    C    = Âᵀ Â / #rows,  eigh (float32), eigenvalues λ sorted descending (they sum to 1)
    r    = #{j : Σ_{i≤j} λ_i / Σ λ ≤ β} + 1,   U = the top-r eigenvectors
    P_s  = I − α U Uᵀ,                          B' = B P_s   (B = Δ in the stored layout)

``neurons`` says which side the rows of the stored weight are on (a fact of the model family: whether
HF stores ``fc_out`` as a torch ``Linear`` (out, in) — ``models/families`` ``HFName.transpose``):

* ``"out"`` — HF ``Linear`` (GPT-J, Llama, SmolLM2, Qwen, Phi): rows are the d output neurons, U lives
  in key space (d_k) and, on our (d_k, d) kernel increment, ``inc' = (I − α U Uᵀ) inc`` (Δ' = Δ P_s).
  The default.
* ``"in"`` — GPT-2 ``Conv1D`` (stored (d_k, d), our kernel layout): rows are the d_k key neurons, U
  lives in output space (d) and ``inc' = inc (I − α U Uᵀ)`` (Δ' = P_s Δ).  Set by the GPT-2 XL presets.

The field is explicit (it is a hyper-parameter of the reference's computation, and the write only sees
kernels); ``check_model`` refuses a run whose model family stores ``fc_out`` the other way
(``stored_neurons``), so a GPT-2 run cannot silently use the Linear layout.

Gated for ``neurons="out"``: P_s depends only on W, so Δ' = R·(B P_s) with AlphaEdit's gate B
(``project_gate``).  With ``neurons="in"`` the projector acts on the output side, Δ' = P_s R B, which is
linear in R but not of the form R·B'(K): ``project_gate`` raises ``NotGatedError`` (no MetaKE on GPT-2).
``alpha = 0`` is AlphaEdit exactly.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import ClassVar

import jax
import jax.numpy as jnp

from metake_jax.editors.alphaedit import AlphaEdit
from metake_jax.editors.base import NotGatedError
from metake_jax.editors.linalg import mm
from models import families
from models.config import ModelConfig

Array = jax.Array

NEURONS = ("out", "in")
#: ε of the reference's row normalisation Â = A / (‖A_i‖ + ε)
ROW_EPS = 1e-8


@partial(jax.jit, static_argnames=("neurons",))
def soft_directions(W: Array, beta: float | Array, neurons: str) -> tuple[Array, Array]:
    """The top-energy directions of a kernel W (d_k, d): ``(U, mask)`` with U (n, n) the eigenvectors of
    the row-normalised Gram sorted by descending eigenvalue and ``mask`` (n,) 1 on the first r of them
    (r = the count of cumulative energy ratios ≤ β, plus one).  n = d_k for ``neurons="out"``, d for
    ``"in"``.  Computed in W's dtype (float32 for the model's kernels, as the reference; float64 under
    x64 for the oracle tests).  docs/FORMULAS.md §B6."""
    dt = jnp.promote_types(W.dtype, jnp.float32)
    A = (W.T if neurons == "out" else W).astype(dt)  # the stored layout: rows = neurons
    A_hat = A / (jnp.linalg.norm(A, axis=1, keepdims=True) + ROW_EPS)
    C = mm(A_hat.T, A_hat) / A.shape[0]
    lam, vec = jnp.linalg.eigh(C)  # ascending
    lam, vec = lam[::-1], vec[:, ::-1]
    ratio = jnp.cumsum(lam) / jnp.sum(lam)
    r = jnp.sum(ratio <= beta) + 1
    mask = (jnp.arange(lam.shape[0]) < r).astype(dt)
    return vec, mask


@partial(jax.jit, static_argnames=("neurons",))
def soft_projector(W: Array, beta: float | Array, alpha: float | Array, neurons: str) -> Array:
    """``P_s = I − α U Uᵀ`` (n, n) of kernel W (d_k, d); n = d_k (``neurons="out"``) or d (``"in"``).
    docs/FORMULAS.md §B6; BASELINES.md §6."""
    U, mask = soft_directions(W, beta, neurons)
    UUt = mm(U * mask, U.T)
    return jnp.eye(U.shape[0], dtype=U.dtype) - jnp.asarray(alpha, U.dtype) * UUt


@partial(jax.jit, static_argnames=("neurons",))
def sphere_project(inc: Array, W: Array, beta: float | Array, alpha: float | Array, neurons: str) -> Array:
    """SPHERE's projection of a kernel increment ``inc`` (d_k, d) by the soft projector of the kernel
    ``W`` (d_k, d): ``P_s inc`` (``neurons="out"``) or ``inc P_s`` (``"in"``).  docs/FORMULAS.md §B6."""
    Ps = soft_projector(W, beta, alpha, neurons).astype(inc.dtype)
    return mm(Ps, inc) if neurons == "out" else mm(inc, Ps)


def stored_neurons(cfg: ModelConfig) -> str:
    """``"out"`` when the model's HF checkpoint stores ``fc_out`` as a torch ``Linear`` (out, in) — rows
    are output neurons — else ``"in"`` (GPT-2 ``Conv1D``, stored (in, out)): the family fact behind
    ``SPHERE.neurons`` (``models/families``, ``HFName.transpose``)."""
    fam = families.get(cfg.family)
    for n in fam.layer_names(cfg):
        if ("mlp", "fc_out", "kernel") in n.paths:
            return "out" if n.transpose else "in"
    raise ValueError(f"model family {cfg.family!r} names no HF tensor for mlp/fc_out/kernel")


@dataclasses.dataclass(frozen=True)
class SPHERE(AlphaEdit):
    """SPHERE: AlphaEdit's increment times the soft projector of the current weight (docs/FORMULAS.md §B6).

    beta: cumulative energy ratio of the suppressed directions (SP README 0.5); alpha: suppression
    strength (0.5 on AlphaEdit; 0 = AlphaEdit exactly); neurons: ``"out"`` (HF Linear families, the
    default) | ``"in"`` (GPT-2 Conv1D) — see the module docstring.  Raises ValueError naming
    ``editor.sphere.<field>`` for beta outside [0, 1], alpha outside [0, 1] or an unknown neurons.
    Other fields: AlphaEdit's (``l2``, ``solve_dtype``).
    """

    name: ClassVar[str] = "sphere"
    reference: ClassVar[str] = "PlusLabNLP/SPHERE AlphaEdit/AlphaEdit_main.py (project_B_into_soft_dirs)"

    beta: float = 0.5
    alpha: float = 0.5
    neurons: str = "out"

    def __post_init__(self) -> None:
        super().__post_init__()
        for f in ("beta", "alpha"):
            if not 0.0 <= float(getattr(self, f)) <= 1.0:
                raise ValueError(f"editor.sphere.{f} must be in [0, 1], got {getattr(self, f)!r}")
        if self.neurons not in NEURONS:
            raise ValueError(f"editor.sphere.neurons must be one of {NEURONS}, got {self.neurons!r}")

    def check_model(self, cfg: ModelConfig) -> None:
        want = stored_neurons(cfg)
        if self.neurons != want:
            raise ValueError(f"editor.sphere.neurons={self.neurons!r} does not match the {cfg.family} family, whose "
                             f"HF checkpoint stores fc_out with rows = {'output' if want == 'out' else 'key'} "
                             f"neurons: set editor.sphere.neurons={want}")

    def project(self, inc: Array, W: Array, slot: Array | int) -> Array:
        return sphere_project(inc, W, float(self.beta), float(self.alpha), self.neurons)

    def is_gated(self) -> bool:
        return self.neurons == "out"

    def project_gate(self, B: Array, W: Array, slot: Array | int) -> Array:
        if not self.is_gated():
            raise NotGatedError("editor sphere with neurons='in' (GPT-2 Conv1D) projects the output side, "
                                "Δ' = P_s R B, not Δ = R·B(K): MetaKE cannot refine its targets")
        Ps = soft_projector(W, float(self.beta), float(self.alpha), self.neurons).astype(B.dtype)
        return mm(B, Ps.T)


EDITOR = SPHERE
