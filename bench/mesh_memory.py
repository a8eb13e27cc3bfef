"""Per-device memory of Stage I and the multi-layer write at GPT-J-6B and Llama-3-8B shapes on an
emulated 8-device mesh, 1×8 vs 8×1 (issue 16), from the compiled programs' memory analysis.

    python bench/mesh_memory.py                       # both models, both meshes, float32
    python bench/mesh_memory.py --models gpt-j-6b --meshes 1x8 --dtype bfloat16

No weights are read or built: params, the edit batch, C_p and P are ``jax.ShapeDtypeStruct``s
carrying the run's shardings (``metake_jax.sharding``: logical-axis rules for the params, request
rows over ``data``, d_k × d_k matrices row-sharded over every device), and each stage is
``jit(...).lower(...).compile()``d for 8 emulated CPU devices.  Reported per device:
arguments + outputs + temporaries − aliased (``memory_analysis()``; XLA:CPU's buffer assignment,
a guide to the TPU/GPU figure, not a measurement on them).
Batch: ``--n`` requests (reference 100, padded up to a multiple of 8) × 7 rows (bare prompt,
5 context templates, KL prompt), ``--tokens`` tokens per row, 4 target tokens; remat on (the
reference configs' setting).  One markdown row per (model, mesh, stage) on stdout.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as PS  # noqa: E402

from metake_jax.batch import EditBatch  # noqa: E402
from metake_jax.editor import _write  # noqa: E402
from metake_jax.sharding import param_shardings, run_mesh, spec_for, stats_sharding  # noqa: E402
from metake_jax.targets import StageIConfig, optimize_targets_grouped  # noqa: E402
from metake_jax.editors import LayerStats  # noqa: E402
from metake_jax.editors.alphaedit import AlphaEdit  # noqa: E402
from models.random_model import param_shapes, random_config  # noqa: E402

MODELS = {  # size -> (random variant, edited layers of configs/<model>_cf.py)
    "gpt-j-6b": ("gptj", (3, 4, 5, 6, 7, 8)),
    "llama3-8b": ("llama", (4, 5, 6, 7, 8)),
}
GiB = 2**30


def _sds(shape, dtype, mesh, logical):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec_for(logical, shape, mesh)))


def abstract_inputs(cfg, mesh, layers, n, T, Tt=4, per=7):
    """(params, batch, order, Z, stats) as ShapeDtypeStructs placed as the runner places them."""
    shapes = param_shapes(cfg)
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.dtype(cfg.param_dtype)), shapes,
                          is_leaf=lambda x: isinstance(x, tuple))
    sh = param_shardings(shapes, mesh)
    params = jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h), shapes, sh)
    R = n * per
    rows = lambda shape, dt: _sds(shape, dt, mesh, ("rows",) + (None,) * (len(shape) - 1))  # noqa: E731
    batch = EditBatch(tokens=rows((R, T), jnp.int32), mask=rows((R, T), jnp.bool_), lookup=rows((R,), jnp.int32),
                      tgt_pos=rows((R, Tt), jnp.int32), tgt_ids=rows((R, Tt), jnp.int32),
                      tgt_mask=rows((R, Tt), jnp.bool_), key_avg=rows((n, R), jnp.float32),
                      nll_avg=rows((n, R), jnp.float32), kl_sel=rows((n, R), jnp.float32),
                      bare_row=rows((n,), jnp.int32), valid=rows((n,), jnp.float32))
    order = rows((R,), jnp.int32)
    Z = jax.ShapeDtypeStruct((cfg.d_model, n), jnp.float32, sharding=NamedSharding(mesh, PS()))
    m, dk = len(layers), cfg.d_ff
    mat = jax.ShapeDtypeStruct((m, dk, dk), jnp.float32, sharding=stats_sharding(mesh, (m, dk, dk)))
    return params, batch, order, Z, LayerStats(P=mat, C0=None, Cp=mat)


def per_device(compiled) -> tuple[float, dict[str, float]]:
    ma = compiled.memory_analysis()
    parts = {k: getattr(ma, f"{k}_size_in_bytes") / GiB for k in ("argument", "output", "temp", "alias")}
    return parts["argument"] + parts["output"] + parts["temp"] - parts["alias"], parts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="gpt-j-6b,llama3-8b")
    ap.add_argument("--meshes", default="1x8,8x1")
    ap.add_argument("--stages", default="stage1,write")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=32)
    a = ap.parse_args(argv)
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices; dtype {a.dtype}, "
          f"n={a.n} requests, {a.tokens} tokens/row", flush=True)
    print("| model | mesh (data×model) | stage | per device GiB | arguments | outputs | temporaries | compile s |")
    print("|---|---|---|---:|---:|---:|---:|---:|", flush=True)
    for name in a.models.split(","):
        fam, layers = MODELS[name]
        cfg = random_config(fam, name, dtype=a.dtype).replace(remat=True)
        for ms in a.meshes.split(","):
            d, m = (int(x) for x in ms.split("x"))
            mesh = run_mesh(d, m)
            n = -(-a.n // d) * d
            params, batch, order, Z, stats = abstract_inputs(cfg, mesh, layers, n, a.tokens)
            for stage in a.stages.split(","):
                t = time.perf_counter()
                if stage == "stage1":
                    low = optimize_targets_grouped.lower(cfg, params, batch, order, layers[-1], StageIConfig(),
                                                         (a.tokens,))
                else:
                    low = _write.lower(cfg, params, batch, Z, layers, stats, AlphaEdit(solve_dtype="float32"))
                c = low.compile()
                tot, p = per_device(c)
                print(f"| {name} | {d}×{m} | {stage} | {tot:.2f} | {p['argument']:.2f} | {p['output']:.2f} | "
                      f"{p['temp']:.2f} | {time.perf_counter() - t:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
