"""What an editor is: the interface every downstream editor implements (docs/FORMULAS.md §4, §6).

An editor turns the batch's keys ``K`` (d_k, n_req) and residuals ``R`` (d_model, n_req) of one edited
layer into a kernel increment ``Δᵀ`` (d_k, d_model) (Flax ``(in, out)`` layout of the layer's
``fc_out``).  A concrete editor is a frozen dataclass (hashable: it is a static argument of the jitted
write) whose fields are its hyper-parameters, and it declares, as class attributes:

* ``needs`` — the layer statistics it reads: ``"C0"`` (normalized second moment E[k kᵀ]) and/or
  ``"P"`` (null-space projector of C0).  C_p (Σ K Kᵀ of earlier batches) is always kept.
* ``gated`` — whether its update has the form ``Δ = R · B(K)`` with ``B`` (n_req, d_k) a function of the
  keys and statistics only.  ``B`` is **the gate** (the one meaning of the word in the editing code):
  it is what the MetaKE look-ahead freezes per batch (docs/FORMULAS.md §6), and ``gate()`` returns it.
  Editors whose update is nonlinear in ``R`` (a mask or a spectral restraint of Δ) are not gated.
* ``key_average`` — ``"grouped"`` (MEMIT: ½·bare + ½·mean of the sampled templates) or ``"uniform"``
  (ROME: uniform mean over the rewriting rows); ``uses_bare_keys`` — whether ``increment`` also reads
  the bare-prompt key ``k*``.
* ``per_layer_targets`` — Stage I runs once per edited layer, at that layer, on the model as edited
  so far in the batch, and the residual is not divided (AlphaEdit-BLUE).
* ``one_at_a_time`` — requests are written one by one (ROME: request j+1 sees request j's edit).
* ``stage1_norm_ref`` — what Stage I's clamp and weight decay are relative to when ``stage1.norm_ref`` is
  ``"auto"``: ``"block"`` (MEMIT: ‖h_0‖, block L's output) or ``"mlp"`` (ROME: ‖m_0‖, block L's MLP
  output), both at the bare prompt's subject-last token (docs/FORMULAS.md §3 "Norm reference").
* ``targets`` — ``"block"`` (MEMIT's Stage I: δ on block L's output, residual R = Z − H_L) or
  ``"attn_ffn"`` (PMET: δ_attn and δ_mlp on block L's attention and FFN outputs; Z and the residual
  R = Z − M_L live in FFN-output space, M_L = fc_out(k*) of layer L at the bare prompt).

Hooks with identity defaults: ``residual_divisor`` (the m−t split of the multi-layer write),
``project`` (post-processing of one layer's increment inside the write, e.g. SPHERE) with its
``project_gate`` (the same post-processing applied to the gate, for MetaKE), ``finalize``
(post-processing of all increments after the write, e.g. RECT) and ``readout`` (the weights that are
evaluated and exported, e.g. PRUNE's restraint of the accumulated edit).

Adding an editor: one module in this package defining a subclass, and one line in
``metake_jax/editors/__init__.py`` (``EDITOR_MODULES``).  The run's methods (``--config.method``) and
the config's ``editor.<name>`` sections come from that registry.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from metake_jax.editors.linalg import SolveDiagnostics

Array = jax.Array

SOLVE_DTYPES = ("float32", "float64")
KEY_AVERAGES = ("grouped", "uniform")
STATISTICS = ("C0", "P")
TARGETS = ("block", "attn_ffn")
NORM_REFS = ("block", "mlp")


class LayerStats(NamedTuple):
    """Per-edited-layer matrices, stacked on a leading axis of size m (d_k × d_k each).

    P:  null-space projectors (AlphaEdit), fixed from the unedited model; None when no editor needs it.
    C0: normalized second moments E[k kᵀ] (MEMIT); None when no editor needs it.
    Cp: Σ K Kᵀ of previously written batches (sequential editing).
    """

    P: Array | None
    C0: Array | None
    Cp: Array


class NotGatedError(ValueError):
    """The editor's update is not of the form Δ = R·B(K): MetaKE's look-ahead does not apply."""


@dataclasses.dataclass(frozen=True)
class Editor:
    """Base class of the downstream editors (see the module docstring for the contract).

    Fields shared by every editor:
      solve_dtype: ``float32`` | ``float64`` — dtype of the closed-form solve (docs/FORMULAS.md §R11.1).
      layers: edited layers of this editor, or ``None`` to use the run's ``layers``.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    gated: ClassVar[bool] = True
    key_average: ClassVar[str] = "grouped"
    uses_bare_keys: ClassVar[bool] = False
    per_layer_targets: ClassVar[bool] = False
    one_at_a_time: ClassVar[bool] = False
    targets: ClassVar[str] = "block"
    stage1_norm_ref: ClassVar[str] = "block"
    #: the public code whose computation this editor follows (module docstrings give file and lines)
    reference: ClassVar[str] = ""
    #: hyper-parameters that must be >= 0 (regularizers); checked at construction
    nonnegative: ClassVar[tuple[str, ...]] = ()

    solve_dtype: str = "float32"
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.solve_dtype not in SOLVE_DTYPES:
            raise ValueError(f"editor.{self.name}.solve_dtype must be one of {SOLVE_DTYPES}, got {self.solve_dtype!r}")
        if self.layers is not None:
            ls = tuple(int(x) for x in self.layers)
            if not ls or list(ls) != sorted(set(ls)):
                raise ValueError(f"editor.{self.name}.layers must be a non-empty increasing tuple, got {self.layers}")
            object.__setattr__(self, "layers", ls)
        for f in self.nonnegative:
            if not float(getattr(self, f)) >= 0:
                raise ValueError(f"editor.{self.name}.{f} must be >= 0, got {getattr(self, f)!r}")
        if (self.key_average not in KEY_AVERAGES or not self.needs <= set(STATISTICS)
                or self.targets not in TARGETS or self.stage1_norm_ref not in NORM_REFS):
            raise TypeError(f"editor class {type(self).__name__} declares an unknown key_average, statistic, "
                            "targets or stage1_norm_ref")

    # ------------------------------------------------------------------ configuration

    def is_gated(self) -> bool:
        """Whether this editor, with these hyper-parameters, is gated (``gated`` unless a field rules it out,
        e.g. SPHERE's output-side projection on GPT-2)."""
        return self.gated

    def check_model(self, cfg: Any) -> None:
        """Refuse a model (``models.config.ModelConfig``) this editor's settings do not fit, with a
        ``ValueError`` naming the field (e.g. SPHERE's stored layout).  Default: every model fits."""

    def edit_layers(self, run_layers: tuple[int, ...]) -> tuple[int, ...]:
        """The layers this editor writes: its own ``layers`` field, else the run's."""
        return self.layers if self.layers is not None else tuple(run_layers)

    def scope(self) -> contextlib.AbstractContextManager:
        """64-bit mode around traced calls when this editor solves in float64 (else a no-op)."""
        return jax.enable_x64(True) if self.solve_dtype == "float64" else contextlib.nullcontext()

    @property
    def dtype(self) -> Any:
        return jnp.dtype(self.solve_dtype)

    # ------------------------------------------------------------------ the closed form

    def residual_divisor(self, m: int, t: Array | int) -> Array:
        """The remaining residual is divided by this at step t of m: MEMIT's m − t (docs/FORMULAS.md §4);
        PMET √(m − t), AlphaEdit-BLUE 1."""
        return jnp.asarray(m - t, jnp.float32)

    def increment(self, K: Array, R: Array, slot: Array | int, stats: LayerStats,
                  K_bare: Array | None = None) -> tuple[Array, SolveDiagnostics]:
        """Kernel increment Δᵀ (d_k, d_model) of edited-layer slot ``slot`` from keys K (d_k, n_req) and
        residuals R (d_model, n_req), with the diagnostics of its solve.  Padding columns are zero."""
        raise NotImplementedError

    def gate(self, K: Array, slot: Array | int, stats: LayerStats, K_bare: Array | None = None) -> Array:
        """The gate B (n_req, d_k) with Δ = R·B, i.e. ``increment(K, R) == (R @ B).T``.

        Raises ``NotGatedError`` for editors whose update is not of that form."""
        raise NotGatedError(f"editor {self.name!r} is not gated (its update is not Δ = R·B(K)): "
                            "MetaKE cannot refine its targets")

    def association(self, K: Array, slot: int, stats: LayerStats) -> Array:
        """Per-request association α_i = β_i/(1+β_i) (n_req,) of docs/FORMULAS.md §5, where defined."""
        raise NotImplementedError(f"editor {self.name!r} defines no association statistic")

    # ------------------------------------------------------------------ post-processing hooks

    def project(self, inc: Array, W: Array, slot: Array | int) -> Array:
        """Post-process one layer's increment inside the write (before later layers see it).
        ``W``: that layer's kernel (d_k, d_model) before this batch.  Default: unchanged."""
        return inc

    def project_gate(self, B: Array, W: Array, slot: Array | int) -> Array:
        """The gate (n_req, d_k) of ``project ∘ increment`` given the gate ``B`` of ``increment``:
        ``project(increment(K, R), W) == (R · project_gate(gate(K), W))ᵀ``.  ``W``: that layer's kernel
        (d_k, d_model) before this batch.  Default: ``B`` (``project`` is the identity).  Raises
        ``NotGatedError`` where the projection cannot be absorbed into B."""
        return B

    def finalize(self, deltas: Array, W: Array) -> Array:
        """Post-process all increments (m, d_k, d_model) after the write; ``W`` (m, d_k, d_model): the
        kernels before this batch.  Default: unchanged."""
        return deltas

    def readout(self, W: Array, W0: Array) -> Array:
        """The edited kernels (m, d_k, d_model) that are evaluated and exported, given the current ones
        ``W`` and the unedited ones ``W0``.  Default: ``W`` (the stream's weights)."""
        return W


def hyperparameters(cls: type[Editor]) -> dict[str, Any]:
    """``{field: default}`` of an editor class (its config section ``editor.<name>``)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out
