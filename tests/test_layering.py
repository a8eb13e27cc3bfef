"""The layering of docs/ARCHITECTURE.md, enforced by parsing every import (ast, no execution).

Rules: ``models/`` never imports ``metake_jax/``; within a package a module imports only modules
of its own or a lower layer (``LAYERS`` below, the same table as docs/ARCHITECTURE.md).  A module
missing from the table fails too: place a new module in a layer when you add it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> layers, lowest first; a module may import its own layer and those below.
LAYERS: dict[str, list[set[str]]] = {
    "models": [
        {"errors", "config"},
        {"families.base"},
        {"families.gpt2", "families.gptj", "families.llama", "families.phi"},
        {"families"},  # the registry (imports the family modules by name)
        {"layers"},
        {"interface"},
        {"generate", "random_model", "hf_layout"},
        {"convert"},
        {"embedded"},
        {"load"},
    ],
    "metake_jax": [
        {"errors", "sharding", "checkpoint", "statistics", "evaluate.text_metrics", "evaluate.classification"},
        {"report"},
        {"requests", "tokens", "projector", "templates", "editors.linalg"},
        {"batch", "editors.base", "stats", "data.loaders", "data", "evaluate.scoring"},
        {"editors", "editors.memit", "editors.alphaedit", "editors.rome", "editors.emmet",
         "editors.blue", "editors.pmet", "editors.rect", "editors.prune", "editors.sphere"},  # the registry and one module per editor
        {"keys", "targets", "methods", "evaluate.counterfact", "evaluate.zsre"},
        {"write", "evaluate.glue"},
        {"metake", "evaluate"},
        {"editor", "hypergrad", "run_config"},
        {"runner", "analysis"},
        {"experiment"},  # set-up shared by launchers and benchmarks, on top of the runner
    ],
}
# a package's modules that may use another package (everything else may not)
MAY_IMPORT = {"models": set(), "metake_jax": {"models"}}


def _modules(pkg: str) -> dict[str, Path]:
    """Dotted module names (relative to ``pkg``; a package's __init__ under the package name) -> file."""
    out = {}
    for f in sorted((ROOT / pkg).rglob("*.py")):
        rel = f.relative_to(ROOT / pkg).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        if parts:
            out[".".join(parts)] = f
    return out


def _imports(f: Path, pkg: str, known: set[str]) -> list[tuple[int, str]]:
    """(line, absolute dotted target) of every import in ``f`` (function-level ones too)."""
    mod_parts = f.relative_to(ROOT).with_suffix("").parts
    out = []
    for node in ast.walk(ast.parse(f.read_text(), str(f))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against the importing module's package
                anchor = mod_parts[:-1][: len(mod_parts) - node.level]
                base = ".".join([*anchor, *([base] if base else [])])
            for a in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{base}.{a.name}"
                rel = sub.split(".", 1)[1] if "." in sub else ""
                out.append((node.lineno, sub if sub.split(".")[0] in LAYERS and rel in known else base))
    return out


def _rank(pkg: str) -> dict[str, int]:
    return {m: i for i, layer in enumerate(LAYERS[pkg]) for m in layer}


@pytest.mark.parametrize("pkg", sorted(LAYERS))
def test_every_module_has_a_layer(pkg):
    missing = sorted(set(_modules(pkg)) - set(_rank(pkg)))
    assert not missing, f"{pkg}: modules without a layer in tests/test_layering.py LAYERS: {missing}"


@pytest.mark.parametrize("pkg", sorted(LAYERS))
def test_no_module_imports_a_higher_layer(pkg):
    mods, rank = _modules(pkg), _rank(pkg)
    bad = []
    for name, f in mods.items():
        for line, target in _imports(f, pkg, set(mods)):
            top, _, rel = target.partition(".")
            where = f"{f.relative_to(ROOT)}:{line} imports {target}"
            if top in LAYERS and top != pkg and top not in MAY_IMPORT[pkg]:
                bad.append(f"{where} ({pkg}/ never imports {top}/)")
            elif top == pkg and rel and name in rank:
                if rel not in rank:
                    bad.append(f"{where} (no layer)")
                elif rank[rel] > rank[name]:
                    bad.append(f"{where} (layer {rank[rel]} above {name}'s {rank[name]})")
    assert not bad, "\n".join(bad)


def test_the_check_catches_an_upward_import(tmp_path):
    """The rule has teeth: a models/ module importing metake_jax/ or a higher models/ layer is caught."""
    fake = tmp_path / "models"
    fake.mkdir()
    (fake / "config.py").write_text("from models.load import load_model\nimport metake_jax.runner\n")
    (fake / "load.py").write_text("from models import config\n")
    globals()["ROOT"] = tmp_path
    try:
        with pytest.raises(AssertionError, match=r"(?s)layer \d+ above config.*never imports metake_jax"):
            test_no_module_imports_a_higher_layer("models")
    finally:
        globals()["ROOT"] = Path(__file__).resolve().parents[1]
