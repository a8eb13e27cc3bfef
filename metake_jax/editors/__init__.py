"""The downstream editors and their registry (docs/FORMULAS.md §4, §6; docs/ARCHITECTURE.md).

One module per editor in this package, one line per editor in ``EDITOR_MODULES`` below.  Everything
that lists editors — the run's methods (``metake_jax.methods``), the config's ``editor.<name>``
sections (``default_config``), the runner's statistics — reads this registry.

``build(name, section)`` returns the editor (a frozen dataclass of its hyper-parameters) from the
config section ``editor.<name>``; an unknown editor or field is a ``ValueError`` naming it.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Mapping

from metake_jax.editors.base import Editor, LayerStats, NotGatedError, hyperparameters

#: editor name -> module defining it (the module's ``EDITOR`` attribute is the class)
EDITOR_MODULES: dict[str, str] = {
    "memit": "metake_jax.editors.memit",
    "alphaedit": "metake_jax.editors.alphaedit",
    "rome": "metake_jax.editors.rome",
    "emmet": "metake_jax.editors.emmet",
    "blue": "metake_jax.editors.blue",
    "pmet": "metake_jax.editors.pmet",
    "rect": "metake_jax.editors.rect",
    "prune": "metake_jax.editors.prune",
    "sphere": "metake_jax.editors.sphere",
}

__all__ = ["EDITOR_MODULES", "Editor", "LayerStats", "NotGatedError", "build", "default_config", "get", "names"]


def names() -> tuple[str, ...]:
    """Registered editor names, in registry order."""
    return tuple(EDITOR_MODULES)


def get(name: str) -> type[Editor]:
    """The editor class registered as ``name``; ``ValueError`` naming the known ones otherwise."""
    if name not in EDITOR_MODULES:
        raise ValueError(f"unknown editor {name!r} (known: {', '.join(EDITOR_MODULES)})")
    cls = importlib.import_module(EDITOR_MODULES[name]).EDITOR
    if cls.name != name:
        raise TypeError(f"{EDITOR_MODULES[name]}.EDITOR is named {cls.name!r}, registered as {name!r}")
    return cls


def build(name: str, section: Mapping[str, Any] | None = None) -> Editor:
    """The editor ``name`` with hyper-parameters from ``section`` (the config's ``editor.<name>``).

    Missing fields take the editor's defaults; an unknown field raises ``ValueError`` naming
    ``editor.<name>.<field>``; values are coerced to the type of the default (tuples for ``layers``)."""
    cls = get(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    defaults = hyperparameters(cls)
    kw: dict[str, Any] = {}
    for key, value in dict(section or {}).items():
        if key not in fields:
            raise ValueError(f"editor.{name}.{key} is not a hyper-parameter of {name} "
                             f"(known: {', '.join(fields)})")
        kw[key] = _coerce(name, key, value, defaults.get(key))
    return cls(**kw)


def _coerce(name: str, key: str, value: Any, default: Any) -> Any:
    if value is None:
        return None
    try:
        if isinstance(default, bool):
            if not isinstance(value, (bool, int)):
                raise TypeError
            return bool(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, str):
            return str(value)
        if key == "layers" or isinstance(default, tuple):
            return tuple(int(x) for x in value) if key == "layers" else tuple(value)
    except (TypeError, ValueError):
        raise ValueError(f"editor.{name}.{key}={value!r} is not a {type(default).__name__}") from None
    return value


def default_config() -> dict[str, dict[str, Any]]:
    """``{editor name: {hyper-parameter: default}}`` — the ``editor`` section of configs/base.py."""
    return {n: hyperparameters(get(n)) for n in EDITOR_MODULES}
