"""The run's methods (``--config.method``), derived from the editor registry (docs/FORMULAS.md §4, §6).

* ``<editor>`` — every registered editor on its own (Stage I targets, then its write).
* ``metake_<editor>`` — MetaKE's bi-level refinement of the targets before the write, for every
  **gated** editor (Δ = R·B(K), docs/FORMULAS.md §6); ``metake`` is ``metake_alphaedit``.
* the ablations of docs/FORMULAS.md §6 over AlphaEdit: ``metake_nobilevel`` (T = 0),
  ``metake_keyonly`` (key-only gate), ``metake_stopgrad`` (Δ_L detached), ``metake_ungated``
  (Δ_L detached, task gradient through the residual stream).
"""
from __future__ import annotations

from typing import Any, NamedTuple

from metake_jax import editors

#: ablation -> MetaKE fields it fixes (over AlphaEdit)
ABLATIONS: dict[str, dict[str, Any]] = {
    "metake_nobilevel": {"steps": 0}, "metake_keyonly": {"gate": "keyonly"},
    "metake_stopgrad": {"feedback": "stopgrad"}, "metake_ungated": {"feedback": "ungated"},
}
DEFAULT_METAKE_EDITOR = "alphaedit"


class Method(NamedTuple):
    """What a method name means: the downstream editor, and the MetaKE overrides (None: no MetaKE)."""

    editor: str
    metake: dict[str, Any] | None


def gated_editors() -> tuple[str, ...]:
    return tuple(n for n in editors.names() if editors.get(n).gated)


def methods() -> tuple[str, ...]:
    """Every valid ``config.method``, editors first."""
    return (*editors.names(), "metake", *(f"metake_{n}" for n in gated_editors() if n != DEFAULT_METAKE_EDITOR),
            *ABLATIONS)


def resolve(method: str) -> Method:
    """``method`` → (editor name, MetaKE overrides or None).  ``ValueError`` naming the valid methods."""
    if method in editors.EDITOR_MODULES:
        return Method(method, None)
    if method == "metake":
        return Method(DEFAULT_METAKE_EDITOR, {})
    if method in ABLATIONS:
        return Method(DEFAULT_METAKE_EDITOR, dict(ABLATIONS[method]))
    if method.startswith("metake_") and method in methods():
        return Method(method[len("metake_"):], {})
    inner = method[len("metake_"):]
    if method.startswith("metake_") and inner in editors.EDITOR_MODULES:
        raise ValueError(f"config.method={method!r}: MetaKE needs a gated editor (update Δ = R·B(K)) and {inner!r} "
                         f"is not (gated: {', '.join(gated_editors())}; docs/FORMULAS.md §6)")
    raise ValueError(f"config.method={method!r} is not one of {', '.join(methods())}")
