"""A 1-D device mesh and helpers to split a batch over its ``data`` axis.

Used by the statistics pass (docs/FORMULAS.md §4, C0 = E[k kᵀ]) and the per-layer projector
eigendecompositions.  On one device everything degenerates to ordinary placement.

Multi-device tests on CPU emulate devices with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
(must be set before ``jax`` is imported, so tests run it in a subprocess).
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS

DATA_AXIS = "data"

__all__ = [
    "DATA_AXIS", "batch_sharding", "make_mesh", "mesh_size", "pad_to_multiple", "replicated",
    "shard_batch",
]


def make_mesh(axis_name: str = DATA_AXIS, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``axis_name`` over ``devices`` (default: all devices)."""
    devs = list(jax.devices() if devices is None else devices)
    if not devs:
        raise ValueError("make_mesh: no devices given")
    return Mesh(np.asarray(devs, dtype=object), (axis_name,))


def mesh_size(mesh: Mesh | None, axis_name: str = DATA_AXIS) -> int:
    """Number of devices along ``axis_name`` (1 without a mesh)."""
    return 1 if mesh is None else int(mesh.shape[axis_name])


def batch_sharding(mesh: Mesh, ndim: int, axis: int = 0, axis_name: str = DATA_AXIS) -> NamedSharding:
    """NamedSharding splitting dimension ``axis`` of an ``ndim``-array over ``axis_name``."""
    spec = [None] * ndim
    spec[axis] = axis_name
    return NamedSharding(mesh, PS(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    """NamedSharding that keeps a full copy on every device."""
    return NamedSharding(mesh, PS())


def pad_to_multiple(x: np.ndarray | jax.Array, k: int, axis: int = 0, value: float | int = 0):
    """Pad ``x`` along ``axis`` with ``value`` so that its length is a multiple of ``k``."""
    n = x.shape[axis]
    extra = (-n) % k
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    mod = np if isinstance(x, np.ndarray) else jax.numpy
    return mod.pad(x, widths, constant_values=value)


def shard_batch(x: np.ndarray | jax.Array, mesh: Mesh | None, axis: int = 0,
                axis_name: str = DATA_AXIS) -> jax.Array:
    """Place ``x`` with dimension ``axis`` split over the mesh (must divide evenly; see
    :func:`pad_to_multiple`).  Without a mesh, a plain ``device_put``."""
    if mesh is None:
        return jax.device_put(x)
    n = mesh_size(mesh, axis_name)
    if x.shape[axis] % n:
        raise ValueError(
            f"shard_batch: dimension {axis} of size {x.shape[axis]} is not a multiple of the "
            f"{n} devices on mesh axis {axis_name!r}; pad it first (pad_to_multiple)"
        )
    return jax.device_put(x, batch_sharding(mesh, x.ndim, axis, axis_name))
