"""The typed run configuration: every field of a run, its default and its check, in ONE place.

Users write and override an ml_collections ``ConfigDict`` (``configs/*.py``, ``--config.x.y=...``);
``configs/base.get_config()`` is ``to_config_dict(RunConfig())``, so the defaults below are the only
ones.  ``RunConfig.of(config)`` validates a ConfigDict (or a plain nested dict) once into these frozen
dataclasses: a field it does not know, a value of the wrong type or outside its allowed values
raises ``ConfigError`` with one line naming the field (``config.eval.glue_every: ...``); a field the
ConfigDict leaves out takes its default here.  Code past that point reads typed attributes only.

Adding a field is one line in its section's dataclass (type, default, comment); a new section is one
dataclass and one field of ``RunConfig``.  A field that changes the edited weights is part of the
resume fingerprint (``runner``): give it the default that reproduces the older behaviour and, if
older checkpoints must keep resuming, list it in ``runner._ADDED_LATER``.

Sections reuse the library's own dataclasses where they already are the run's knobs:
``stage1`` is ``targets.StageIConfig``, ``editor.<name>`` is the registered editor's class
(``metake_jax.editors``: a new editor brings its section) and ``metake`` is ``metake.MetaKEConfig`` (its
``edit_weight`` / ``loc_weight`` / ``anchor_weight`` appear to users as ``metake.weights.{edit,loc,
anchor}``, ``_GROUPS``).  The method (``config.method``) is checked by the method table,
``runner.edit_config``.  Formulas behind the fields: docs/FORMULAS.md §2–§9, §R3–§R8.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Union

from metake_jax import editors
from metake_jax.errors import ConfigError
from metake_jax.metake import MetaKEConfig
from metake_jax.stats import PRECISIONS, CorpusSpec
from metake_jax.targets import StageIConfig

__all__ = ["ConfigError", "DataConfig", "DistributedConfig", "EditorSection", "EvalConfig", "MeshConfig", "RunConfig", "SHARED_DATA", "StatsConfig",
           "TemplatesConfig", "data_path", "to_config_dict", "to_dict"]

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"  # benchmark data lives beside the repo, never inside it


def data_path(relative: str) -> str:
    """``<repo>/../shared/data/<relative>`` (the file may be absent; the runner then says so)."""
    return str(SHARED_DATA / relative)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The edit requests (``metake_jax.data.loaders``)."""

    path: str = "demo"  # "demo" = bundled metake_jax/data/demo_counterfact.json, else a JSON file
    format: Literal["auto", "rome", "flat", "zsre"] = "auto"
    n: int | None = None  # number of cases (None = all)
    seed: int | None = None  # None = first n in file order; else a seeded random n (file order kept)
    chat: bool = False  # wrap rewrite / paraphrase / neighborhood prompts in the tokenizer's chat template


def _editor_section() -> type:
    """``EditorSection``: ``editor.<name>`` for every editor of the registry (``metake_jax.editors``), each
    that editor's own frozen dataclass (its fields are its hyper-parameters, its class the defaults), and
    the null-space projector fields shared by the editors that need P (docs/FORMULAS.md §4, §R5)."""

    def post_init(self: Any) -> None:
        _check(self.nullspace_threshold >= 0, f"nullspace_threshold must be >= 0, got {self.nullspace_threshold}")
        _check(self.energy is None or 0 < self.energy <= 1, f"energy must be in (0, 1], got {self.energy}")

    fields: list[tuple[str, Any, Any]] = [
        (n, editors.get(n), dataclasses.field(default_factory=editors.get(n))) for n in editors.names()]
    fields += [("nullspace_threshold", float, dataclasses.field(default=2e-2)),  # absolute eigenvalue cut of C0
               ("energy", Union[float, None], dataclasses.field(default=None))]  # or: keep this energy fraction
    return dataclasses.make_dataclass(
        "EditorSection", fields, frozen=True,
        namespace={"__post_init__": post_init, "__module__": __name__,
                   "__doc__": "editor.<name> per registered editor (its dataclass), nullspace_threshold, energy."})


EditorSection = _editor_section()


_CORPUS = CorpusSpec()


@dataclasses.dataclass(frozen=True)
class StatsConfig:
    """Layer statistics C0 (docs/FORMULAS.md §R3; ``metake_jax.stats``)."""

    kind: Literal["datasets", "files", "model"] = "datasets"  # model: texts sampled from the model itself
    name: str = _CORPUS.name  # HF dataset (kind=datasets)
    config: str | None = _CORPUS.config
    split: str = _CORPUS.split
    paths: tuple[str, ...] = ()  # .txt / .jsonl files (kind=files)
    n_samples: int = 100000
    max_len: int = 512
    token_budget: int = 8192  # tokens per statistics forward batch
    # Σ k kᵀ matmul: highest (float32, reference) | high | default (TF32/bf16 on GPU)
    precision: Literal[tuple(PRECISIONS)] = "highest"  # type: ignore[valid-type]
    seed: int = _CORPUS.seed
    cache_dir: str = ""  # "" = $METAKE_CACHE/stats (default ~/.cache/metake-jax/stats)

    def __post_init__(self) -> None:
        for f in ("n_samples", "max_len", "token_budget"):
            _check(getattr(self, f) >= 1, f"{f} must be >= 1, got {getattr(self, f)}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation (docs/FORMULAS.md §8, §R7–§R8)."""

    pre: bool = True  # evaluate all cases on the unedited model (pre/post table)
    final: bool = True  # evaluate all cases on the final model
    batch: bool = True  # after each batch, efficacy on that batch's cases (cheap; plotted vs edits)
    association: bool = False  # per request: association β before the write and realized γ after it, in
    #   edit_log.jsonl (docs/FORMULAS.md §10 Fig. 4; `launch/analyze.py --analysis=gamma --runs=...`)
    batch_size: int = 32  # scoring batch size
    fluency: bool = False  # CounterFact fluency (n-gram entropy of generations)
    fluency_cases: int = 0  # generations for the first N cases only (0 = all cases)
    max_out_len: int = 100
    reference_stats: str = ""  # dir with attribute_snippets.json / idf.npy / tfidf_vocab.json (consistency)
    glue_dir: str = data_path("glue_eval")  # skipped when the directory is absent
    glue_tasks: tuple[str, ...] = ("sst2", "mrpc", "cola", "rte", "nli", "mmlu")
    glue_n: int = 100  # examples per task
    glue_every: int = 5  # GLUE on the base model and after every k batches (0 = base and final only, -1 = never)
    glue_generation: bool = True  # also the generation-based F1 (slower)

    def __post_init__(self) -> None:
        for f in ("batch_size", "max_out_len", "glue_n"):
            _check(getattr(self, f) >= 1, f"{f} must be >= 1, got {getattr(self, f)}")
        _check(self.fluency_cases >= 0, f"fluency_cases must be >= 0, got {self.fluency_cases}")
        _check(self.glue_every >= -1, f"glue_every must be -1 (never), 0 (base and final) or k >= 1, "
                                      f"got {self.glue_every}")


@dataclasses.dataclass(frozen=True)
class TemplatesConfig:
    """Context templates (docs/FORMULAS.md §2)."""

    seed: int = 0
    file: str = ""  # JSON [["{}"], [...]] to use instead of sampling
    n_per_prompt: int = 1  # samples per seed word (5 seed words) and per length
    length: int = 10  # tokens per sampled template
    # several lengths: one group of n_per_prompt × 5 templates per length, replacing `length`
    # (ROME's reference set: (5, 10) with n_per_prompt 2 → "{}" + 10 of 5 tokens + 10 of 10 tokens)
    lengths: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for f in ("n_per_prompt", "length"):
            _check(getattr(self, f) >= 1, f"{f} must be >= 1, got {getattr(self, f)}")
        _check(all(x >= 1 for x in self.lengths), f"lengths must all be >= 1, got {self.lengths}")

    def group_lengths(self) -> tuple[int, ...]:
        """Token length of each group of sampled templates: ``lengths``, else ``(length,)``."""
        return tuple(self.lengths) or (self.length,)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The run's device mesh (``metake_jax.sharding.run_mesh``; layout rules ``sharding.LOGICAL_RULES``)."""

    data: int = -1  # devices on "data" (request rows, statistics documents; FSDP of params): -1 = the rest
    model: int = 1  # devices on "model" (heads, kv_heads, mlp, vocab of the params): -1 = the rest

    def __post_init__(self) -> None:
        for f in ("data", "model"):
            v = getattr(self, f)
            _check(v == -1 or v >= 1, f"{f} must be a positive device count or -1 (the rest), got {v}")
        _check(not (self.data == -1 and self.model == -1), "data and model are both -1: one axis takes the rest")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """A multi-process run (``jax.distributed``; one process per host).  Unset fields come from
    $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES, $JAX_PROCESS_ID; none at all = one process."""

    coordinator: str = ""  # "host:port" of process 0
    num_processes: int = 0
    process_id: int = -1
    auto: bool = False  # let JAX detect the cluster (Cloud TPU pod slice, SLURM, Open MPI)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One run of the sequential protocol (``runner.run``); every field a user can set."""

    # Model spec: "smollm2" (embedded SmolLM2-135M-Instruct) | path to a .gguf file | a converted
    # (orbax) directory | an HF checkpoint directory | a hub id "org/name" (needs network) |
    # "random:<family>[:<size>]" (random weights + built-in tokenizer).
    model: str = "smollm2"
    dtype: Literal["float32", "bfloat16"] = "float32"  # param/compute dtype
    remat: bool = False  # jax.checkpoint each block in backward passes (ModelConfig.remat): on for 6-8B models
    model_id: str | None = None  # id in the statistics cache key (None: derived from model)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    method: str = "alphaedit"  # one of runner.METHODS (checked by runner.edit_config)
    batch_size: int = 100  # requests per sequential batch (docs/FORMULAS.md §9)
    layers: tuple[int, ...] = (4, 5, 6, 7, 8)  # edited layers (increasing)
    stage1: StageIConfig = dataclasses.field(default_factory=StageIConfig)  # docs/FORMULAS.md §3
    editor: EditorSection = dataclasses.field(default_factory=EditorSection)  # type: ignore[valid-type]
    metake: MetaKEConfig = dataclasses.field(default_factory=MetaKEConfig)  # §6; used by the metake* methods
    stats: StatsConfig = dataclasses.field(default_factory=StatsConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    templates: TemplatesConfig = dataclasses.field(default_factory=TemplatesConfig)
    run_dir: str = "runs/default"
    resume: bool = False  # continue from run_dir/checkpoints (same weights as an uninterrupted run)
    keep_checkpoints: int = 2
    export_hf: str = ""  # if set, write the edited model there as an HF checkpoint
    seed: int = 0  # random models, generations
    progress: bool = True  # tqdm progress bars
    # JAX's persistent compilation cache (compiled programs on disk, keyed by program + compiler + devices:
    # a warm rerun skips XLA compilation, ~30-45 s per Stage I batch on a 2-core CPU).  Opt-in: "auto" =
    # $METAKE_CACHE/xla (default ~/.cache/metake-jax/xla; scripts/demo.sh uses it), a directory, or "off".
    # Not used in a multi-process run (jax.distributed): there every process compiles.  (Off by default: jax
    # 0.10.2 segfaulted once writing a float64 program to the cache in the one-process test suite.)
    compile_cache: str = "off"
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)  # devices: not part of the fingerprint
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        _check(len(self.layers) > 0 and min(self.layers) >= 0 and list(self.layers) == sorted(set(self.layers)),
               f"layers must be a non-empty increasing tuple of layer indices, got {self.layers}")

    @classmethod
    def of(cls, config: Any) -> "RunConfig":
        """``config`` (a ConfigDict, a nested dict or a RunConfig) validated into a RunConfig.

        Raises ``ConfigError`` naming the first bad field (unknown name, wrong type, value not allowed)."""
        if isinstance(config, cls):
            return config
        if hasattr(config, "to_dict"):
            try:
                config = config.to_dict()
            except Exception as e:  # noqa: BLE001 - e.g. a placeholder's type clash surfaces here
                raise ConfigError(f"config: {e}") from e
        if not isinstance(config, Mapping):
            raise ConfigError(f"config must be a ConfigDict or a mapping, got {type(config).__name__}")
        return _build(cls, config, "")

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict in the layout of the ConfigDict (``configs/base.py``)."""
        return to_dict(self)


# ConfigDict sub-sections that gather flat fields of a reused dataclass (the user-facing layout of
# configs/base.py, kept for the CLI and for older checkpoints' fingerprints): class -> {group: {key: field}}.
_GROUPS: dict[type, dict[str, dict[str, str]]] = {
    MetaKEConfig: {"weights": {"edit": "edit_weight", "loc": "loc_weight", "anchor": "anchor_weight"}},
}


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _layout(cls: type) -> list[tuple[str, str | dict[str, str]]]:
    """(config key, field name or {sub key: field name}) in field order."""
    grouped = {f: (g, k) for g, keys in _GROUPS.get(cls, {}).items() for k, f in keys.items()}
    out: list[tuple[str, str | dict[str, str]]] = []
    for f in dataclasses.fields(cls):
        if f.name not in grouped:
            out.append((f.name, f.name))
        elif not any(key == grouped[f.name][0] for key, _ in out):
            out.append((grouped[f.name][0], _GROUPS[cls][grouped[f.name][0]]))
    return out


def _name(t: Any) -> str:
    if typing.get_origin(t) is Literal:
        return " | ".join(map(str, typing.get_args(t)))
    return getattr(t, "__name__", str(t))


def _coerce(t: Any, v: Any, where: str) -> Any:
    """``v`` checked against the annotation ``t`` (bool, int, float, str, Literal, X | None, tuple[X, ...],
    a dataclass); ints widen to float, lists to tuples."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(inner[0], v, where)
        raise TypeError(f"unsupported annotation {t}")  # pragma: no cover - not used by the sections
    if dataclasses.is_dataclass(t):
        if isinstance(v, t):
            return v
        if not isinstance(v, Mapping):
            raise ConfigError(f"config.{where}: expected a section (mapping), got {v!r}")
        return _build(t, v, where + ".")
    if origin is Literal:
        if v not in args:
            raise ConfigError(f"config.{where}={v!r} is not one of {', '.join(map(str, args))}")
        return v
    if origin is tuple:
        if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
            raise ConfigError(f"config.{where}: expected a tuple, got {v!r}")
        return tuple(_coerce(args[0], x, f"{where}[{i}]") for i, x in enumerate(v))
    ok = {bool: lambda x: isinstance(x, bool),
          int: lambda x: isinstance(x, int) and not isinstance(x, bool),
          float: lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
          str: lambda x: isinstance(x, str)}[t]
    if not ok(v):
        raise ConfigError(f"config.{where}: expected {_name(t)}, got {v!r}")
    return float(v) if t is float else v


def _build(cls: type, d: Mapping[str, Any], prefix: str) -> Any:
    hints, kwargs = _hints(cls), {}
    layout = dict(_layout(cls))
    for key in d:
        if key not in layout:
            raise ConfigError(f"config.{prefix}{key}: unknown field (known: {', '.join(layout)})")
    for key, spec in layout.items():
        if key not in d:
            continue
        if isinstance(spec, dict):
            sub = d[key]
            if not isinstance(sub, Mapping):
                raise ConfigError(f"config.{prefix}{key}: expected a section (mapping), got {sub!r}")
            for k in sub:
                if k not in spec:
                    raise ConfigError(f"config.{prefix}{key}.{k}: unknown field (known: {', '.join(spec)})")
            for k, f in spec.items():
                if k in sub:
                    kwargs[f] = _coerce(hints[f], sub[k], f"{prefix}{key}.{k}")
        else:
            kwargs[spec] = _coerce(hints[spec], d[key], f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ValueError as e:  # a section's own check: its message names the field (maybe with the section)
        msg = str(e)
        raise ConfigError(f"config.{msg}" if prefix and msg.startswith(prefix) else f"config.{prefix}{msg}") from e


def to_dict(obj: Any) -> dict[str, Any]:
    """A section (or the RunConfig) as a nested plain dict in the ConfigDict layout."""
    out: dict[str, Any] = {}
    for key, spec in _layout(type(obj)):
        if isinstance(spec, dict):
            out[key] = {k: getattr(obj, f) for k, f in spec.items()}
        else:
            v = getattr(obj, spec)
            out[key] = to_dict(v) if dataclasses.is_dataclass(v) else v
    return out


def _base_type(t: Any) -> type:
    """The Python type a ConfigDict placeholder of annotation ``t`` holds."""
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if typing.get_origin(t) in (Union, types.UnionType):
        return _base_type(args[0])
    if typing.get_origin(t) is Literal:
        return type(args[0])
    return typing.get_origin(t) or t


def to_config_dict(obj: Any) -> Any:
    """The user-facing ``ml_collections.ConfigDict`` of a section or RunConfig (``None`` fields become
    typed placeholders, so ``--config.data.n=8`` can set them)."""
    from ml_collections import ConfigDict
    from ml_collections.config_dict import placeholder

    hints, c = _hints(type(obj)), ConfigDict()
    for key, spec in _layout(type(obj)):
        if isinstance(spec, dict):
            c[key] = ConfigDict({k: getattr(obj, f) for k, f in spec.items()})
            continue
        v = getattr(obj, spec)
        if dataclasses.is_dataclass(v):
            c[key] = to_config_dict(v)
        elif v is None:
            c[key] = placeholder(_base_type(hints[spec]))
        else:
            c[key] = v
    return c
