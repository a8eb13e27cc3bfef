"""HF transformers config / tensor names <-> our param tree, for every registered family.

Pure numpy and generic: the family object (``models.families``) supplies the names, shapes and
config fields; this module only walks them.  ``hf_to_params`` takes a flat ``{name: array}`` HF
state dict (torch layout, fetched lazily) and returns the stacked Flax tree; ``params_to_hf`` is its
inverse (used by the HF export).  Unknown architectures, missing / extra tensors and shape
mismatches raise ``ConversionError`` naming the tensor.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
from flax import traverse_util

from models import families
from models.config import ModelConfig
from models.errors import ConversionError
from models.families.base import HFName, Path, leaf_shape

__all__ = ["ConversionError", "config_from_hf", "hf_to_params", "params_to_hf"]


def config_from_hf(hf: Mapping[str, Any], *, name: str = "model") -> ModelConfig:
    """A ModelConfig from an HF ``config.json`` dict (dispatched on ``model_type``).

    Raises ConversionError for an unknown ``model_type`` or an unsupported option.
    """
    return families.for_model_type(hf).config_from_hf(hf, name=name)


def _entries(cfg: ModelConfig) -> list[tuple[str, HFName, int | None]]:
    """(full HF name, mapping, layer index or None) for every tensor of ``cfg``, top level first."""
    fam = families.get(cfg.family)
    out: list[tuple[str, HFName, int | None]] = [(n.hf, n, None) for n in fam.top_names(cfg)]
    for i in range(cfg.n_layers):
        out += [(fam.layer_prefix.format(i) + n.hf, n, i) for n in fam.layer_names(cfg)]
    return out


def _path(path: Path, layer: int | None) -> Path:
    return path if layer is None else ("layers", *path)


def hf_to_params(
    cfg: ModelConfig, names: list[str], get: Callable[[str], np.ndarray], *, source: str = "checkpoint",
    dtype: Any = np.float32,
) -> dict[str, Any]:
    """Convert tensors (fetched lazily with ``get(raw_name)``) to the stacked param tree.

    names: the raw tensor names of the checkpoint; ``source`` names it in errors.  Per-layer leaves
    are stacked on a leading axis N = n_layers; kernels come out (in, out).  Raises ConversionError
    for a missing, extra or mis-shaped tensor.
    """
    fam = families.get(cfg.family)
    canon = fam.canonical_names(names)
    if cfg.tie_embeddings:
        canon.pop("lm_head.weight", None)  # tied copy
    used: set[str] = set()
    per_path: dict[Path, list[np.ndarray]] = {}
    for hf_name, n, layer in _entries(cfg):
        if hf_name not in canon:
            raise ConversionError(f"{source}: missing tensor {hf_name!r} for {cfg.family} ({cfg.name})")
        used.add(hf_name)
        a = np.asarray(get(canon[hf_name]), dtype=dtype)
        a = a.T if n.transpose else a
        widths = [leaf_shape(cfg, p)[-1] for p in n.paths]
        want = (*leaf_shape(cfg, n.paths[0])[:-1], sum(widths))
        if tuple(a.shape) != want:
            raise ConversionError(f"{source}: tensor {hf_name!r} has shape {tuple(a.shape)} (after layout change), "
                                  f"expected {want}")
        for p, part in zip(n.paths, np.split(a, np.cumsum(widths)[:-1], axis=-1)):
            per_path.setdefault(_path(p, layer), []).append(part)
    flat = {}
    for path in list(per_path):  # pop as we stack: peak ~ one tree, not two
        parts = per_path.pop(path)
        flat[path] = np.stack(parts) if path[0] == "layers" else parts[0]
    ignored = fam.ignored_suffixes
    extra = [canon[n] for n in canon if n not in used and not n.endswith(ignored)]
    if extra:
        raise ConversionError(
            f"{source}: unexpected tensor(s) for {cfg.family}: {', '.join(sorted(extra)[:8])}"
            + (" ..." if len(extra) > 8 else "")
        )
    return traverse_util.unflatten_dict(flat)


def params_to_hf(cfg: ModelConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of ``hf_to_params``: the flat HF (torch-layout) float32 state dict.

    Raises KeyError when ``params`` lacks a leaf of ``cfg``'s layout.
    """
    flat = traverse_util.flatten_dict(params)
    out: dict[str, np.ndarray] = {}
    for hf_name, n, layer in _entries(cfg):
        parts = [np.asarray(flat[_path(p, layer)]) for p in n.paths]  # no copy of a CPU array
        parts = [np.asarray(a if layer is None else a[layer], np.float32) for a in parts]
        a = np.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
        out[hf_name] = np.ascontiguousarray(a.T if n.transpose else a)
    return out
