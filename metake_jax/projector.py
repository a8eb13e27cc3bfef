"""AlphaEdit null-space projector ``P`` from the layer statistics C0 (docs/FORMULAS.md §4, §R5).

``C0 = U Λ Uᵀ`` (``jnp.linalg.eigh`` of the symmetrized, *normalized* ``E[k kᵀ]``; on a symmetric
PSD matrix this equals the reference's ``svd(cov)``), keep the eigenvectors ``Û`` of the small
eigenvalues and return ``P = Û Ûᵀ`` (so ``P K0 ≈ 0`` for preserved keys).

Which eigenvectors are kept:

* ``threshold`` rule (reference, default): keep ``j`` with ``λ_j < threshold`` (strict, absolute,
  in the units of the normalized E[kkᵀ]; reference value 2e-2).
* ``energy`` rule (AlphaEdit issues #26/#38): with eigenvalues sorted ascending, clipped at 0
  (``w_j = max(λ_j, 0)``), keep ``j`` iff ``Σ_{i ≤ j} w_i ≤ (1 − energy) · Σ_i w_i``; i.e. the
  removed (preserved-knowledge) directions are the top eigenvectors that together carry at least
  the fraction ``energy`` of the total eigenvalue mass.  ``energy`` in [0, 1]; when given, it
  replaces ``threshold``.

A kept rank of 0 (P = 0: nothing can be edited) or full (P = I: nothing is protected) only warns.
``projectors_for_layers`` spreads the per-layer eigendecompositions over the devices of a 1-D
mesh (layer axis sharded with ``shard_map``, padded to a multiple of the device count); each
device runs the same per-layer computation as the one-device path.
"""
from __future__ import annotations

import warnings
from functools import partial
from typing import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as PS

from metake_jax.sharding import DATA_AXIS, make_mesh, mesh_size, pad_to_multiple, to_host

Array = jax.Array

__all__ = ["kept_mask", "nullspace_projector", "projector_rank", "projectors_for_layers"]

_HI = jax.lax.Precision.HIGHEST


def _validate(threshold: float, energy: float | None) -> None:
    if energy is not None and not 0.0 <= float(energy) <= 1.0:
        raise ValueError(f"energy must be in [0, 1], got {energy}")
    if energy is None and threshold is None:
        raise ValueError("give a nullspace threshold or an energy fraction")


def kept_mask(eigvals: Array, *, threshold: float = 2e-2, energy: float | None = None) -> Array:
    """Boolean mask over ascending ``eigvals`` of the eigenvectors the projector keeps (see module doc)."""
    if energy is None:
        return eigvals < threshold
    w = jnp.maximum(eigvals, 0.0)
    return jnp.cumsum(w) <= (1.0 - energy) * jnp.sum(w)


def _projector_one(C0: Array, threshold: float, energy: float | None) -> tuple[Array, Array]:
    C0 = C0.astype(jnp.float32)
    C0 = 0.5 * (C0 + C0.T)
    evals, U = jnp.linalg.eigh(C0)  # ascending
    keep = kept_mask(evals, threshold=threshold, energy=energy)
    Uk = U * keep.astype(U.dtype)[None, :]
    P = jnp.matmul(Uk, U.T, precision=_HI)
    return P, jnp.sum(keep).astype(jnp.int32)


@partial(jax.jit, static_argnames=("threshold", "energy"))
def _projector_jit(C0, threshold, energy):
    return _projector_one(C0, threshold, energy)


def _warn_rank(rank: int, d_k: int, where: str, threshold: float, energy: float | None) -> None:
    rule = f"energy={energy}" if energy is not None else f"threshold={threshold}"
    if rank == 0:
        warnings.warn(
            f"{where}: null-space projector has rank 0 ({rule}): every direction is preserved, "
            "so AlphaEdit cannot write anything", RuntimeWarning, stacklevel=3)
    elif rank == d_k:
        warnings.warn(
            f"{where}: null-space projector has full rank {d_k} ({rule}): P = I protects nothing "
            "(is C0 the normalized E[kkᵀ], not the raw sum?)", RuntimeWarning, stacklevel=3)


def nullspace_projector(C0: Array, *, threshold: float = 2e-2, energy: float | None = None,
                        layer: int | None = None, return_rank: bool = False):
    """Null-space projector ``P`` (d_k, d_k) of one layer's normalized C0 (docs/FORMULAS.md §4).

    Returns ``P`` or ``(P, rank)`` with ``return_rank``.  Warns when the kept rank is 0 or d_k.
    """
    chex.assert_rank(C0, 2)
    chex.assert_axis_dimension(C0, 0, C0.shape[1])
    _validate(threshold, energy)
    P, rank = _projector_jit(C0, float(threshold), None if energy is None else float(energy))
    if not isinstance(rank, jax.core.Tracer):
        _warn_rank(int(rank), C0.shape[0], f"layer {layer}" if layer is not None else "projector",
                   threshold, energy)
    return (P, rank) if return_rank else P


def projector_rank(C0: Array, *, threshold: float = 2e-2, energy: float | None = None) -> int:
    """Rank of the projector ``nullspace_projector(C0, ...)`` would return (eigenvalues only)."""
    _validate(threshold, energy)
    evals = jnp.linalg.eigvalsh(0.5 * (C0 + C0.T).astype(jnp.float32))
    return int(jnp.sum(kept_mask(evals, threshold=threshold, energy=energy)))


def projectors_for_layers(
    C0_stack: Array,
    *,
    threshold: float = 2e-2,
    energy: float | None = None,
    mesh: Mesh | None = None,
    layers: Sequence[int] | None = None,
    axis_name: str = DATA_AXIS,
) -> tuple[Array, np.ndarray]:
    """Projectors for every edited layer: ``C0_stack`` (m, d_k, d_k) -> ``(P (m, d_k, d_k), ranks (m,))``.

    With several devices (``mesh`` given, or ``mesh=None`` and more than one device visible) the
    layer axis is padded to a multiple of the device count and split over the mesh with
    ``shard_map``; each device eigendecomposes its own layers, one after the other (``lax.map``: a
    batched eigh would need every layer's solver workspace at once, which does not fit beside GPT-J's
    weights at d_k = 16384 on an 80 GB GPU).  ``layers`` only names layers in
    warnings.  Same numbers as the one-device path (per-layer computations are identical).
    """
    chex.assert_rank(C0_stack, 3)
    m, d_k, d_k2 = C0_stack.shape
    if d_k != d_k2:
        raise ValueError(f"C0_stack must be (m, d_k, d_k), got {C0_stack.shape}")
    _validate(threshold, energy)
    names = list(layers) if layers is not None else list(range(m))
    if len(names) != m:
        raise ValueError(f"{len(names)} layer names for {m} statistics matrices")
    thr, en = float(threshold), None if energy is None else float(energy)
    if mesh is None and jax.device_count() > 1:
        mesh = make_mesh(axis_name)
    one = partial(_projector_one, threshold=thr, energy=en)
    if mesh is None or mesh_size(mesh, axis_name) == 1:
        P, ranks = jax.jit(partial(jax.lax.map, one))(jnp.asarray(C0_stack))
    else:
        n = mesh_size(mesh, axis_name)
        padded = pad_to_multiple(jnp.asarray(C0_stack, jnp.float32), n, axis=0)
        fn = jax.jit(jax.shard_map(
            partial(jax.lax.map, one), mesh=mesh, in_specs=PS(axis_name), out_specs=(PS(axis_name), PS(axis_name))))
        P, ranks = fn(padded)
        P, ranks = P[:m], ranks[:m]
    ranks = to_host(ranks)
    for l, r in zip(names, ranks):
        _warn_rank(int(r), d_k, f"layer {l}", thr, en)
    return P, ranks
