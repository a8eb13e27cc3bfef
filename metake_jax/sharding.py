"""The run's device mesh, the logical-axis rules that lay parameters out on it, and batch helpers.

* ``run_mesh(data, model)``: the one 2-D mesh of a run, axes ``("data", "model")`` (−1 = the rest;
  default: every device on ``data``), built once by the runner from ``config.mesh``.
* ``LOGICAL_RULES``: a MaxText-style table mapping the logical axes of every parameter leaf
  (``param_logical_axes``: layers, embed, heads, kv_heads, mlp, vocab, …) and of the d_k × d_k
  statistics (``dk_rows``) and request rows (``rows``) to mesh axes; resolved with
  ``flax.linen.logical_to_mesh_axes``.  A dimension the mesh axis does not divide stays whole.
* ``shard_params`` / ``shard_stats`` / ``shard_rows``: place a param tree, the (m, d_k, d_k)
  matrices, and an edit batch on the mesh; every jitted stage then runs SPMD with the shardings of
  its inputs (XLA propagates them and inserts the collectives).
* ``make_mesh``, ``batch_sharding``, ``shard_batch``: the 1-D ``data`` helpers used by the
  statistics pass (docs/FORMULAS.md §4, C0 = E[k kᵀ]) and the per-layer projector eigendecompositions.

On one device everything degenerates to ordinary placement.

Multi-device tests on CPU emulate devices with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
(must be set before ``jax`` is imported, so tests run it in a subprocess).
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS

DATA_AXIS = "data"
MODEL_AXIS = "model"
MESH_AXES = (DATA_AXIS, MODEL_AXIS)

log = logging.getLogger(__name__)

__all__ = [
    "DATA_AXIS", "LOGICAL_RULES", "MESH_AXES", "MODEL_AXIS", "batch_sharding", "describe_layout", "make_mesh",
    "any_process", "barrier", "init_distributed", "is_writer", "leaf_logical_axes", "leaf_placer", "mesh_of",
    "mesh_size", "replicate", "pad_to_multiple", "param_logical_axes", "param_shardings", "process_row_share",
    "put_global", "put_process_rows", "replicated", "to_host",
    "run_mesh", "shard_batch", "shard_params", "shard_rows", "shard_stats", "spec_for", "stats_sharding",
]

# Logical axis -> mesh axis, MaxText style (first rule whose mesh axis is still free wins; flax
# ``logical_to_mesh_axes``).  ``embed`` over ``data`` is FSDP: on an all-``data`` mesh the weights
# are still split 8 ways (all-gathered layer by layer inside the jitted stages).  ``layers`` stays
# whole: the forward pass scans over it with a dynamic index.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("layers", None),
    ("embed", DATA_AXIS),
    ("heads", MODEL_AXIS),
    ("kv_heads", MODEL_AXIS),
    ("mlp", MODEL_AXIS),
    ("vocab", MODEL_AXIS),
    ("head_dim", None),
    ("positions", None),
    ("dk_rows", (DATA_AXIS, MODEL_AXIS)),  # rows of C0, P, C_p (m, d_k, d_k): over every device
    ("dk_cols", None),
    ("rows", DATA_AXIS),  # request rows of an edit batch / statistics batch
)

# Param path (joined with "/") suffix -> logical axes of the leaf; the layer-stacked leaves under
# "layers/" get a leading "layers" axis.  Every family's layout (models/families) is covered;
# test_sharding checks that each leaf of every family matches exactly one entry.
_LEAF_AXES: dict[str, tuple[str | None, ...]] = {
    "embed/wte": ("vocab", "embed"),
    "embed/wpe": ("positions", "embed"),
    "ln_f/scale": ("embed",),
    "ln_f/bias": ("embed",),
    "lm_head/kernel": ("embed", "vocab"),
    "lm_head/bias": ("vocab",),
    "ln_1/scale": ("embed",), "ln_1/bias": ("embed",),
    "ln_2/scale": ("embed",), "ln_2/bias": ("embed",),
    "attn/q/kernel": ("embed", "heads"), "attn/q/bias": ("heads",),
    "attn/k/kernel": ("embed", "kv_heads"), "attn/k/bias": ("kv_heads",),
    "attn/v/kernel": ("embed", "kv_heads"), "attn/v/bias": ("kv_heads",),
    "attn/o/kernel": ("heads", "embed"), "attn/o/bias": ("embed",),
    "attn/q_norm/scale": ("head_dim",), "attn/k_norm/scale": ("head_dim",),
    "mlp/fc_in/kernel": ("embed", "mlp"), "mlp/fc_in/bias": ("mlp",),
    "mlp/gate/kernel": ("embed", "mlp"), "mlp/up/kernel": ("embed", "mlp"),
    "mlp/gate/bias": ("mlp",), "mlp/up/bias": ("mlp",),
    "mlp/fc_out/kernel": ("mlp", "embed"), "mlp/fc_out/bias": ("embed",),
}


def run_mesh(data: int = -1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The run's 2-D mesh ``(data, model)`` over ``devices`` (default: all, every process's).

    ``-1`` (at most one of the two) takes the rest of the devices.  When ``data * model`` is less
    than the device count the first ``data * model`` devices are used (a warning says so).
    Raises ValueError (naming ``mesh.data`` / ``mesh.model``) for sizes that do not fit.
    """
    devs = list(jax.devices() if devices is None else devices)
    n = len(devs)
    d, m = int(data), int(model)
    for name, v in (("mesh.data", d), ("mesh.model", m)):
        if v == 0 or v < -1:
            raise ValueError(f"{name}={v}: must be a positive device count or -1 (the rest)")
    if d == -1 and m == -1:
        raise ValueError("mesh.data and mesh.model are both -1: at most one axis can take the rest")
    if d == -1 or m == -1:
        fixed = m if d == -1 else d
        if n % fixed:
            raise ValueError(f"mesh.{'model' if d == -1 else 'data'}={fixed} does not divide the {n} devices")
        d, m = (n // fixed, fixed) if d == -1 else (fixed, n // fixed)
    if d * m > n:
        raise ValueError(f"mesh.data={d} x mesh.model={m} needs {d * m} devices; {n} are visible")
    if d * m < n:
        log.warning("mesh %dx%d uses %d of the %d devices", d, m, d * m, n)
    if d * m == n and devices is None:
        from jax.experimental import mesh_utils  # topology-aware order (TPU ICI rings)

        try:
            grid = mesh_utils.create_device_mesh((d, m), devices=devs)
        except (AssertionError, ValueError, NotImplementedError):
            grid = np.asarray(devs, dtype=object).reshape(d, m)
    else:
        grid = np.asarray(devs[:d * m], dtype=object).reshape(d, m)
    return Mesh(grid, MESH_AXES)


def init_distributed(coordinator: str = "", num_processes: int = 0, process_id: int = -1,
                     auto: bool = False) -> bool:
    """``jax.distributed.initialize`` for a multi-process run; must run before any computation.

    Values left unset come from the environment (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
    ``JAX_PROCESS_ID``); ``auto`` lets JAX detect a cluster (Cloud TPU pod slice, SLURM, Open MPI,
    Kubernetes) with nothing given.  On CPU the cross-process collectives are gloo's.  Returns True
    when a distributed runtime is (now) up, False for a single-process run (nothing set).  Raises
    ValueError naming the field for an incomplete setting.
    """
    import os

    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num_processes = int(num_processes or os.environ.get("JAX_NUM_PROCESSES", 0) or 0)
    pid = int(process_id) if int(process_id) >= 0 else int(os.environ.get("JAX_PROCESS_ID", -1))
    if jax.distributed.is_initialized():
        return True
    if not (auto or coordinator or num_processes > 1):
        return False
    if not auto and (not coordinator or num_processes < 1 or not 0 <= pid < num_processes):
        raise ValueError(f"distributed: coordinator={coordinator!r}, num_processes={num_processes}, "
                         f"process_id={pid}: give all three (or distributed.auto=True on a detected cluster)")
    if jax.config.jax_platforms in (None, "", "cpu") or str(jax.config.jax_platforms).startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if auto and not coordinator:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=pid)
    log.info("distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def enable_compile_cache(path: str) -> None:
    """JAX's persistent compilation cache in ``path`` (``~`` expanded; "" leaves JAX's setting as it is).

    JAX keys each entry by the program, the compiler options and the devices, so an entry is reused only
    for the same computation; programs that compile in under a second are not stored (JAX's default).
    Raises nothing: an unwritable directory only costs the cache (JAX warns)."""
    if not path:
        return
    import os

    from jax.experimental.compilation_cache import compilation_cache as cc

    path = os.path.expanduser(path)
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        cc.reset_cache()  # JAX opens its cache once per process; reopen it at the new directory


def is_writer() -> bool:
    """Whether this process writes run files (JSON, markdown, plots): process 0 only."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches ``name`` (no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def replicate(x: Any, mesh: Mesh | None) -> Any:
    """``x`` (host or device) as a replicated global array on ``mesh`` (None: unchanged)."""
    return x if mesh is None else put_global(x, replicated(mesh))


def mesh_of(tree: Any) -> Mesh | None:
    """The mesh of the first leaf of ``tree`` placed with a NamedSharding, or None."""
    for x in jax.tree.leaves(tree):
        sh = getattr(x, "sharding", None)
        if isinstance(sh, NamedSharding):
            return sh.mesh
    return None


def _axis_size(mesh: Mesh, axis: str | tuple[str, ...] | None) -> int:
    if axis is None:
        return 1
    names = (axis,) if isinstance(axis, str) else tuple(axis)
    return int(np.prod([mesh.shape[a] for a in names if a in mesh.shape]))


def spec_for(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
             rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> PS:
    """PartitionSpec of an array with ``logical`` axis names and ``shape`` on ``mesh``.

    Rules are resolved by ``flax.linen.logical_to_mesh_axes``; mesh axes absent from ``mesh`` or
    of size 1 are dropped, and a dimension the mesh axes do not divide evenly stays whole.
    """
    import flax.linen as nn

    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} for an array of shape {tuple(shape)}")
    spec = nn.logical_to_mesh_axes(tuple(logical), tuple(rules))
    out = []
    for dim, ax in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if ax is not None:
            names = tuple(a for a in ((ax,) if isinstance(ax, str) else ax)
                          if a in mesh.shape and mesh.shape[a] > 1)
            ax = None if not names else names[0] if len(names) == 1 else names
        if ax is not None and dim % _axis_size(mesh, ax):
            ax = None
        out.append(ax)
    return PS(*out)


def leaf_logical_axes(path: Sequence[str], shape: Sequence[int]) -> tuple[str | None, ...]:
    """Logical axis names of the param leaf at ``path`` (e.g. ``("layers", "mlp", "fc_out", "kernel")``).

    Raises ValueError naming the leaf when the path has no entry (a new family's layout) or the
    names do not match its rank."""
    key = "/".join(str(p) for p in path)
    stacked = path[0] == "layers"
    rel = "/".join(str(p) for p in path[1:]) if stacked else key
    axes = _LEAF_AXES.get(rel)
    if axes is None:
        raise ValueError(f"sharding: no logical axes for param {key!r} (add it to sharding._LEAF_AXES)")
    axes = (("layers",) if stacked else ()) + axes
    if len(axes) != len(shape):
        raise ValueError(f"sharding: param {key!r} of shape {tuple(shape)} vs logical axes {axes}")
    return axes


def param_logical_axes(params: Any) -> Any:
    """Tree like ``params`` whose leaves are tuples of logical axis names (``leaf_logical_axes``)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({p: leaf_logical_axes(p, np.shape(x)) for p, x in flat.items()})


def leaf_placer(mesh: Mesh | None, rules: Sequence[tuple[str, Any]] = LOGICAL_RULES):
    """``place(path, host_array) -> jax.Array`` for ``models.load.load_model(place=...)``: each leaf
    goes straight from host memory to its shards on ``mesh`` (None mesh: None, the default device)."""
    if mesh is None:
        return None

    def place(path, host):
        spec = spec_for(leaf_logical_axes(tuple(path), host.shape), host.shape, mesh, rules)
        return put_global(host, NamedSharding(mesh, spec))

    return place


def param_shardings(params: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Any:
    """NamedSharding tree of ``params`` (arrays or ``jax.ShapeDtypeStruct`` leaves) by the rules."""
    axes = param_logical_axes(params)
    return jax.tree.map(lambda x, a: NamedSharding(mesh, spec_for(a, np.shape(x), mesh, rules)),
                        params, axes, is_leaf=lambda a: isinstance(a, tuple))


def shard_params(params: Any, mesh: Mesh | None, rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Any:
    """``params`` placed on ``mesh`` by the logical-axis rules (None: returned unchanged).

    Host (numpy) leaves are copied shard by shard (``jax.device_put`` with a NamedSharding sends
    each device only its slice), so no device ever holds a full copy; device leaves are resharded.
    """
    if mesh is None:
        return params
    return jax.tree.map(put_global, params, param_shardings(params, mesh, rules))


def to_host(x: Any) -> np.ndarray:
    """``x`` as one numpy array on this host, gathered from every process when it spans several.

    A replicated array is read from this process's first copy (``addressable_data(0)``, no
    communication); a sharded one that spans processes is all-gathered
    (``multihost_utils.process_allgather``), so every process must call this for it, in the same
    order.  Anything else: ``np.asarray``."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def any_process(flag: bool) -> bool:
    """``flag`` OR-ed over every process (itself in a single-process run): a decision every process
    must take the same way (e.g. "some process lacks a cache, so all of them compute it") —
    one all-gather of one byte."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32))).any())


def process_row_share(mesh: Mesh, axis_name: str = DATA_AXIS) -> tuple[int, int] | None:
    """(this process's group, number of groups) when the rows split over ``axis_name`` give each
    process one contiguous block: processes holding the same block form one group (replicas, e.g.
    when the ``model`` axis spans processes) and the groups cut the rows into equal blocks, in
    order.  None when the layout is not like that (then every process builds the whole batch and
    ``put_global`` cuts it).  (0, 1) in a single-process run."""
    if jax.process_count() == 1:
        return 0, 1
    n = mesh_size(mesh, axis_name)
    idx = NamedSharding(mesh, PS(axis_name)).devices_indices_map((n,))
    rows: dict[int, set[int]] = {}
    for dev, (sl,) in idx.items():
        rows.setdefault(dev.process_index, set()).update(range(*sl.indices(n)))
    blocks = sorted({(min(r), max(r) + 1) for r in rows.values()})
    size = blocks[0][1] - blocks[0][0]
    ok = all(b - a == size and a == i * size for i, (a, b) in enumerate(blocks))
    ok = ok and all(r == set(range(min(r), max(r) + 1)) for r in rows.values())
    if not ok:
        return None
    mine = rows[jax.process_index()]
    return blocks.index((min(mine), max(mine) + 1)), len(blocks)


def put_process_rows(local: np.ndarray, mesh: Mesh, n_rows: int, axis_name: str = DATA_AXIS) -> jax.Array:
    """The global (n_rows, …) array split over ``axis_name`` of which this process holds the rows of
    its group (``process_row_share``): ``jax.make_array_from_process_local_data``."""
    local = np.asarray(local)
    sh = batch_sharding(mesh, local.ndim, 0, axis_name)
    if jax.process_count() == 1:
        return jax.device_put(local, sh)
    return jax.make_array_from_process_local_data(sh, local, (n_rows,) + local.shape[1:])


def put_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """``x`` (numpy or jax) placed with ``sharding``; across processes a host value is cut shard by
    shard (``jax.make_array_from_callback``: each process supplies its own devices' slices)."""
    if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def describe_layout(params: Any, mesh: Mesh | None) -> str:
    """One log line: the mesh and how the params lie on it (per-device bytes, a few specs)."""
    if mesh is None:
        return "mesh: none (one device)"
    total = sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
    per_dev = 0
    for x in jax.tree.leaves(params):
        sh = getattr(x, "sharding", None)
        shard = sh.shard_shape(x.shape) if sh is not None else x.shape
        per_dev += int(np.prod(shard)) * np.dtype(x.dtype).itemsize
    flat = traverse_util.flatten_dict(params)
    show = []
    for path in (("embed", "wte"), ("layers", "attn", "q", "kernel"), ("layers", "mlp", "fc_out", "kernel")):
        if path in flat and isinstance(getattr(flat[path], "sharding", None), NamedSharding):
            show.append(f"{'/'.join(path)}={tuple(flat[path].sharding.spec)}")
    shape = " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
    return (f"mesh {shape} ({mesh.devices.size} {mesh.devices.flat[0].platform} devices, "
            f"{jax.process_count()} process(es)); params {total / 2**20:.1f} MiB, "
            f"{per_dev / 2**20:.1f} MiB per device; " + ", ".join(show))


def stats_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Sharding of a stack of d_k × d_k matrices (m, d_k, d_k): rows over every device."""
    return NamedSharding(mesh, spec_for(("layers", "dk_rows", "dk_cols"), shape, mesh))


def shard_stats(x: Any, mesh: Mesh | None) -> Any:
    """Place an (m, d_k, d_k) array (or None) row-sharded on ``mesh`` (None mesh: unchanged)."""
    if mesh is None or x is None:
        return x
    return put_global(x, stats_sharding(mesh, x.shape))


def shard_rows(arrays: Any, mesh: Mesh | None) -> Any:
    """Every array leaf of ``arrays`` on ``mesh`` with its leading dimension over ``data`` when it
    divides evenly, else replicated (None mesh: ``jnp.asarray`` of each leaf)."""
    if mesh is None:
        return jax.tree.map(jax.numpy.asarray, arrays)

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        logical = ("rows",) + (None,) * (x.ndim - 1) if x.ndim else ()
        return put_global(x, NamedSharding(mesh, spec_for(logical, x.shape, mesh)))

    return jax.tree.map(put, arrays)


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
