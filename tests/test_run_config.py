"""The typed run configuration (metake_jax/run_config.py): one source of defaults, the ConfigDict layout
kept, and every bad field refused with one line naming it."""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest

from metake_jax import editors
from metake_jax.errors import ConfigError, RunError
from metake_jax.metake import MetaKEConfig
from metake_jax.run_config import RunConfig, to_config_dict, to_dict
from metake_jax.targets import StageIConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py") if p.stem != "__init__")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_defaults_are_base_py():
    """configs/base.py is the RunConfig defaults (same fields, values and types), and the reused
    library dataclasses keep their own defaults."""
    from configs import base

    c = base.get_config()
    assert RunConfig.of(c) == RunConfig()
    fc, fr = _flat(c.to_dict()), _flat(to_dict(RunConfig()))
    assert sorted(fc) == sorted(fr)
    assert all(type(fc[k]) is type(fr[k]) and fc[k] == fr[k] for k in fc), [k for k in fc if fc[k] != fr[k]]
    assert RunConfig().stage1 == StageIConfig() and RunConfig().metake == MetaKEConfig()
    assert all(getattr(RunConfig().editor, n) == editors.get(n)() for n in editors.names())
    # eval.glue_every has one default and one meaning (-1 never, 0 base+final, k every k batches)
    assert RunConfig.of({}).eval.glue_every == c.eval.glue_every == 5
    # a field a config leaves out takes its default
    assert RunConfig.of({"method": "memit", "eval": {"pre": False}}) == dataclasses.replace(
        RunConfig(), method="memit", eval=dataclasses.replace(RunConfig().eval, pre=False))


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_round_trip(name):
    """Every shipped config validates; the typed config has the ConfigDict's layout and values (the
    fingerprint / cache-key layout), and ConfigDict → RunConfig → ConfigDict is the identity."""
    c = importlib.import_module(f"configs.{name}").get_config()
    rc = RunConfig.of(c)
    assert to_dict(rc) == c.to_dict()
    assert RunConfig.of(to_config_dict(rc)) == rc
    assert RunConfig.of(rc) is rc


BAD = [  # (dotted field, value, the message: field named first)
    ("batch_size", "4", r"^config\.batch_size: expected int, got '4'$"),
    ("batch_size", 0, r"^config\.batch_size must be >= 1, got 0$"),
    ("resume", 1, r"^config\.resume: expected bool, got 1$"),
    ("layers", (2, 1), r"^config\.layers must be a non-empty increasing tuple"),
    ("layers", (1, "2"), r"^config\.layers\[1\]: expected int, got '2'$"),
    ("dtype", "float16", r"^config\.dtype='float16' is not one of float32, bfloat16$"),
    ("data.format", "csv", r"^config\.data\.format='csv' is not one of auto, rome, flat, zsre$"),
    ("data.n", 2.5, r"^config\.data\.n: expected int, got 2\.5$"),
    ("stage1.lr", "fast", r"^config\.stage1\.lr: expected float, got 'fast'$"),
    ("stage1.row_groups", 0, r"^config\.stage1\.row_groups must be >= 1, got 0$"),
    ("editor.alphaedit.solve_dtype", "float16", r"^config\.editor\.alphaedit\.solve_dtype must be one of .*float16"),
    ("editor.memit.mom2_update_weight", "big", r"^config\.editor\.memit\.mom2_update_weight: expected float, got 'big'$"),
    ("editor.alphaedit.layers", (3, 2), r"^config\.editor\.alphaedit\.layers must be a non-empty increasing tuple"),
    ("editor.nope", {}, r"^config\.editor\.nope: unknown field \(known: memit, alphaedit, .*nullspace_threshold, energy\)$"),
    ("editor.l2", 10.0, r"^config\.editor\.l2: unknown field"),
    ("editor.energy", 1.5, r"^config\.editor\.energy must be in \(0, 1\], got 1\.5$"),
    ("metake.gate", "open", r"^config\.metake\.gate='open' is not one of structural \| keyonly$"),
    ("metake.weights.anchor", -1.0, r"^config\.metake\.lr must be > 0 and metake\.weights\.anchor >= 0"),
    ("metake.weights.bogus", 1.0, r"^config\.metake\.weights\.bogus: unknown field \(known: edit, loc, anchor\)$"),
    ("stats.kind", "texts", r"^config\.stats\.kind='texts' is not one of datasets, files, model$"),
    ("stats.precision", "tf32", r"^config\.stats\.precision='tf32' is not one of highest, high, default$"),
    ("stats.paths", "a.txt", r"^config\.stats\.paths: expected a tuple, got 'a\.txt'$"),
    ("eval.glue_every", -2, r"^config\.eval\.glue_every must be -1 \(never\), 0 \(base and final\) or k >= 1"),
    ("eval.glue_tasks", ("sst2", 3), r"^config\.eval\.glue_tasks\[1\]: expected str, got 3$"),
    ("eval.foo", 1, r"^config\.eval\.foo: unknown field \(known: pre, final, "),
    ("templates.length", 0, r"^config\.templates\.length must be >= 1, got 0$"),
    ("sharding", {}, r"^config\.sharding: unknown field \(known: model, dtype, "),
    ("mesh.pipeline", 2, r"^config\.mesh\.pipeline: unknown field \(known: data, model\)$"),
    ("mesh.data", 0, r"^config\.mesh\.data must be a positive device count or -1 \(the rest\), got 0$"),
]


@pytest.mark.parametrize("field,value,message", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_bad_field_names_it(field, value, message):
    from configs import tiny_cf

    d = tiny_cf.get_config().to_dict()
    *parents, leaf = field.split(".")
    node = d
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ConfigError, match=message) as e:
        RunConfig.of(d)
    assert isinstance(e.value, RunError) and "\n" not in str(e.value)  # a user error of launch._common: one line


def test_unknown_method_is_a_config_error():
    from configs import tiny_cf
    from metake_jax.runner import edit_config

    c = tiny_cf.get_config()
    c.method = "nope"
    with pytest.raises(ConfigError, match=r"^config\.method='nope' is not one of memit, alphaedit, .*metake"):
        edit_config(c)


def test_method_ablations_fix_metake_fields():
    """The method table: each MetaKE ablation overrides exactly its field of the config's metake section;
    the method's editor is the config's editor.<name> section."""
    from metake_jax.methods import ABLATIONS
    from metake_jax.runner import edit_config

    rc = RunConfig.of({"method": "metake", "metake": {"steps": 7, "lr": 0.01}})
    assert edit_config(rc).metake == rc.metake and edit_config(dataclasses.replace(rc, method="memit")).metake is None
    assert edit_config(rc).editor == rc.editor.alphaedit
    rm = RunConfig.of({"method": "memit", "editor": {"memit": {"mom2_update_weight": 2e4, "layers": [1, 2]}}})
    assert edit_config(rm).editor == rc.editor.memit.__class__(mom2_update_weight=2e4, layers=(1, 2))
    assert edit_config(rm).layers == (1, 2)  # the editor's own layers override the run's
    for method, fixed in ABLATIONS.items():
        got = edit_config(dataclasses.replace(rc, method=method)).metake
        assert got == dataclasses.replace(rc.metake, **fixed)
        assert {f: getattr(got, f) for f in fixed} == fixed


_CACHE_CHILD = """
import sys
import jax, jax.numpy as jnp
from metake_jax.sharding import enable_compile_cache
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
enable_compile_cache(sys.argv[1])
f = jax.jit(lambda x: jnp.sin(x) * 3.0 + jnp.arange(7.0))
print(float(f(jnp.ones(7))[6]))
"""


def test_compile_cache_dir_and_persistent_cache(tmp_path, monkeypatch):
    """``compile_cache``: "auto" = $METAKE_CACHE/xla, "off" (default) = none, else the directory; enabling it makes JAX
    store a program that takes ≥ the threshold to compile (threshold lowered to 0 here). The cache is switched on in
    a child process: JAX keeps its cache open for the rest of a process even after the directory is unset, and
    the suite's other programs must not be written to it."""
    import math
    import subprocess
    import sys

    from metake_jax.runner import compile_cache_dir

    monkeypatch.setenv("METAKE_CACHE", str(tmp_path / "root"))
    assert compile_cache_dir(RunConfig(compile_cache="auto")) == str(tmp_path / "root" / "xla")
    assert compile_cache_dir(RunConfig()) == ""
    assert compile_cache_dir(RunConfig(compile_cache=str(tmp_path / "x"))) == str(tmp_path / "x")
    r = subprocess.run([sys.executable, "-c", _CACHE_CHILD, str(tmp_path / "x")], capture_output=True, text=True,
                       timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.split()[-1]) == pytest.approx(math.sin(1.0) * 3 + 6, rel=1e-6)
    assert any((tmp_path / "x").iterdir())  # the compiled program is on disk
