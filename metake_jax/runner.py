"""The sequential editing protocol (docs/FORMULAS.md §9, §R5 "Sequential protocol").

``run(config)`` does, for a run configuration (``configs/base.py``):

1. load the model and tokenizer (``models.load.load_model``, incl. ``random:<family>[:<size>]``);
2. select the cases (``metake_jax.data.loaders``), in file order;
3. context templates (docs/FORMULAS.md §2; ``metake_jax.templates.context_templates``, seeded, cached in
   ``run_dir/templates.json``; or ``templates.file``);
4. layer statistics C0 (``metake_jax.stats.layer_stats``, cached) → projectors P (AlphaEdit /
   MetaKE) or C0 (MEMIT);
5. pre-edit evaluation of all cases and GLUE on the base model;
6. the batches of ``batch_size`` cases through ``editor.edit_batch``, each on top of the last
   (C_p accumulates), with a checkpoint after every batch (``metake_jax.checkpoint``); GLUE after
   every k batches; the just-edited batch's efficacy (cheap) for the edits-vs-metrics plot;
7. final evaluation of all cases on the final model; results.json, results.md, plots
   (``metake_jax.report``), optional HF export.

``resume=True`` restarts from the last checkpoint: the base model is loaded and the edited layers'
kernels and C_p are overwritten from the checkpoint, so the run ends with the same weights as an
uninterrupted one; no case is edited twice or skipped.  A batch that raises leaves the state
unchanged and stops the run with a ``RunError`` naming the batch and its case ids.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metake_jax import editors
from metake_jax.checkpoint import RunCheckpointer
from metake_jax.editor import EditConfig, EditState, edit_batch, init_state
from metake_jax.errors import EditError, RequestError
from metake_jax.metake import MetaKEConfig
from metake_jax.methods import methods, resolve
from metake_jax.requests import Case
from metake_jax.stats import CORPUS_KINDS, PRECISIONS
from metake_jax.targets import StageIConfig
from metake_jax.tokens import ChatFormat, chat_format
from models.config import ModelConfig
from models.interface import w_out, with_w_out

log = logging.getLogger(__name__)

METHODS = methods()  # from the editor registry (metake_jax.methods)

__all__ = [
    "METHODS", "RunError", "RunHooks", "cases_digest", "chat_of", "check_inputs", "edit_config", "load_model_spec",
    "load_run_cases", "run", "get_templates", "layer_statistics", "model_id_for", "stats_cache_dir",
]


class RunError(RuntimeError):
    """The run cannot go on (bad config, failed batch, inconsistent checkpoint); says why."""


@dataclasses.dataclass
class RunHooks:
    """Callbacks for tests and tools. ``after_checkpoint(batches_done, state)`` runs right after
    each batch's checkpoint is written."""

    after_checkpoint: Callable[[int, EditState], None] | None = None


# ============================================================================ config → objects


def _get(c: Any, dotted: str, default: Any = None) -> Any:
    cur = c
    for part in dotted.split("."):
        try:
            cur = cur[part]
        except (KeyError, TypeError, AttributeError):
            return default
    return default if cur is None else cur


def edit_config(c: Any) -> EditConfig:
    """``method`` + hyper-parameters → ``EditConfig`` (the method table of the brief / docs/FORMULAS.md §4, §6)."""
    try:
        meth = resolve(str(c.method))
    except ValueError as e:
        raise RunError(str(e)) from e
    precision = _stats_precision(c)
    if precision not in PRECISIONS:  # checked before the model loads, not at the statistics pass
        raise RunError(f"config.stats.precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    kind = _get(c, "stats.kind", CORPUS_KINDS[0])
    if kind not in CORPUS_KINDS:
        raise RunError(f"config.stats.kind={kind!r} is not one of {', '.join(CORPUS_KINDS)}")
    dtype = str(_get(c, "dtype", "float32"))
    if dtype not in ("float32", "bfloat16"):  # checked before anything is loaded or written
        raise RunError(f"config.dtype={dtype!r} is not one of float32, bfloat16")
    try:
        editor = editors.build(meth.editor, _get(c, f"editor.{meth.editor}", {}))
    except (TypeError, ValueError) as e:
        raise RunError(f"config.{e}" if str(e).startswith("editor.") else str(e)) from e
    s = c.stage1
    try:
        stage1 = StageIConfig(lr=float(s.lr), steps=int(s.steps), clamp_norm_factor=float(s.clamp_norm_factor),
                              kl_factor=float(s.kl_factor), weight_decay=float(s.weight_decay),
                              early_stop=float(_get(c, "stage1.early_stop", 5e-2)),
                              row_groups=int(_get(c, "stage1.row_groups", StageIConfig.row_groups)))
    except ValueError as e:
        raise RunError(f"config.{e}") from e
    metake = None
    if meth.metake is not None:
        m = c.metake
        w = _get(c, "metake.weights", {}) or {}
        fields = dict(
            steps=int(m.steps), lr=float(m.lr), gate=str(m.gate), feedback=str(_get(c, "metake.feedback", "gated")),
            anchor=str(_get(c, "metake.anchor", "relative")), line_search=str(_get(c, "metake.line_search", "batch")),
            max_halvings=int(_get(c, "metake.max_halvings", 8)),
            edit_weight=float(w.get("edit", 1.0)), loc_weight=float(w.get("loc", 1.0)),
            anchor_weight=float(w.get("anchor", 1.0)), prompts=str(_get(c, "metake.prompts", "all")))
        fields.update(meth.metake)
        try:
            metake = MetaKEConfig(**fields)
        except ValueError as e:
            raise RunError(f"config.{e}") from e
    try:
        layers = editor.edit_layers(tuple(int(l) for l in c.layers))
        return EditConfig(layers=layers, stage1=stage1, editor=editor, metake=metake)
    except ValueError as e:
        raise RunError(f"config.layers: {e}") from e


def model_id_for(spec: str, cfg: ModelConfig, seed: int, dtype: str) -> str:
    """A stable id of the model for the statistics cache key."""
    s = str(spec)
    if s.startswith("random:"):
        base = f"{s.replace(':', '-')}-seed{seed}"
    elif s.lower() in ("smollm2", "embedded"):
        base = cfg.name if cfg.name != "model" else "smollm2-135m-instruct"
    else:
        p = Path(s).expanduser()
        base = p.stem if p.suffix == ".gguf" else (p.name if p.exists() else s.replace("/", "_"))
        if p.exists():
            base += "-" + hashlib.sha1(str(p.resolve()).encode()).hexdigest()[:8]
    return base if dtype == "float32" else f"{base}-{dtype}"


def load_model_spec(spec: str, *, dtype: str = "float32", seed: int = 0,
                    remat: bool = False) -> tuple[ModelConfig, Any, Any]:
    """(cfg, params, tokenizer) for any model spec of ``configs/base.py`` (incl. ``random:...``).

    ``remat`` sets ``ModelConfig.remat`` (per-block rematerialization in backward passes)."""
    from models.errors import ConversionError
    from models.load import RANDOM_PREFIX, load_model

    random = str(spec).startswith(RANDOM_PREFIX)
    try:
        cfg, params, tok = load_model(str(spec), dtype=dtype, seed=seed)
    except ConversionError as e:
        if not random:
            raise
        raise RunError(f"config.model={spec!r}: {e}") from e
    cfg = cfg.replace(remat=bool(remat))
    if tok is None and not random:
        raise RunError(f"config.model={spec!r}: no tokenizer found beside the checkpoint "
                       "(editing needs one: save it with tokenizer.save_pretrained into the model dir)")
    return cfg, params, tok


def load_run_cases(c: Any, tokenizer: Any) -> list[Case]:
    """The selected cases of ``config.data`` (validated against the tokenizer), in file order.

    Raises ``RequestError`` (bad record; two cases with the same subject and prompt but different
    target_new), ``DataUnavailableError`` (missing file) or ``RunError`` (nothing selected, mixed kinds).
    """
    from metake_jax.data.loaders import load_cases, load_demo
    from metake_jax.requests import check_conflicts

    d = c.data
    n, seed = _get(c, "data.n"), _get(c, "data.seed")
    if d.path in ("demo", "", None):
        cases = load_demo(n=n, seed=seed, tokenizer=tokenizer)
    else:
        cases = load_cases(os.path.expanduser(d.path), d.format, n=n, seed=seed, tokenizer=tokenizer)
    if not cases:
        raise RunError(f"config.data: no cases selected from {d.path!r}")
    kinds = {x.kind for x in cases}
    if len(kinds) != 1:
        raise RunError(f"config.data: mixed case kinds {sorted(kinds)} in {d.path!r}")
    check_conflicts([x.request for x in cases])
    return cases


def chat_of(c: Any, tokenizer: Any) -> ChatFormat | None:
    """``config.data.chat``: the tokenizer's ``ChatFormat`` (prompts wrapped in its chat template), or None."""
    if not bool(_get(c, "data.chat", False)):
        return None
    try:
        return chat_format(tokenizer)
    except ValueError as e:
        raise RunError(f"config.data.chat=True: {e}") from e


def cases_digest(cases: Sequence[Case]) -> str:
    """sha256 of the selected cases' content (every field, after the loaders' normalisation)."""
    blob = json.dumps([dataclasses.asdict(x) for x in cases], sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def check_inputs(c: Any, cfg: ModelConfig, tokenizer: Any, cases: Sequence[Case], templates: Sequence[Sequence[str]],
                 chat: ChatFormat | None = None) -> None:
    """Every row the run will build — each batch's rewriting rows with every context template, and
    every evaluation pair — tokenized up front (no model call): ``RequestError`` naming the case and
    field for a bad request or a row longer than ``cfg.max_positions``, before anything is written."""
    from metake_jax.batch import prepare_batch
    from metake_jax.evaluate.counterfact import counterfact_pairs
    from metake_jax.evaluate.zsre import zsre_pairs
    from metake_jax.tokens import PairError, encode_pairs

    bs = int(c.batch_size)
    for i in range(0, len(cases), bs):
        prepare_batch(tokenizer, [x.request for x in cases[i:i + bs]], templates, n_pad=bs, chat=chat,
                      max_positions=cfg.max_positions)
    prefixes, conts, slots = (zsre_pairs if cases[0].kind == "zsre" else counterfact_pairs)(cases, chat)
    for j in range(0, len(prefixes), 4096):
        try:
            rows, _ = encode_pairs(tokenizer, prefixes[j:j + 4096], conts[j:j + 4096])
        except PairError as e:
            ci, field = slots[j + e.index][0], slots[j + e.index][-1]
            raise RequestError(e.reason, case_id=cases[ci].case_id, field=field) from e
        for k, r in enumerate(rows):
            if len(r) > cfg.max_positions:
                ci, field = slots[j + k][0], slots[j + k][-1]
                raise RequestError(f"{field} with its answer is {len(r)} tokens, longer than the model's "
                                   f"{cfg.max_positions} positions", case_id=cases[ci].case_id, field=field)


def _validate_templates(t: Any, where: str) -> list[list[str]]:
    if (not isinstance(t, list) or not all(isinstance(g, list) and all(isinstance(s, str) for s in g) for g in t)
            or not any("{}" == s for g in t for s in g)):
        raise RunError(f"{where}: context templates must be a JSON list of lists of strings including \"{{}}\"")
    for g in t:
        for s in g:
            if s.count("{}") != 1:
                raise RunError(f"{where}: template {s!r} must contain '{{}}' exactly once")
    return t


def _templates(c: Any, cfg: ModelConfig, params: Any, tokenizer: Any, run_dir: Path,
               model_id: str) -> tuple[list[list[str]], Callable[[], None] | None]:
    """(templates, write) — ``write`` stores newly sampled templates in ``run_dir/templates.json``
    (None when they came from a file or the cache); nothing is written here."""
    f = _get(c, "templates.file", "")
    if f:
        p = Path(f).expanduser()
        if not p.is_file():
            raise RunError(f"config.templates.file: {p} not found")
        try:
            return _validate_templates(json.loads(p.read_text()), str(p)), None
        except json.JSONDecodeError as e:
            raise RunError(f"config.templates.file: {p} is not valid JSON ({e})") from e
    key = {"model_id": model_id, "seed": int(c.templates.seed), "n_per_prompt": int(c.templates.n_per_prompt),
           "length": int(c.templates.length)}
    cache = run_dir / "templates.json"
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("key") == key:
            return _validate_templates(stored["templates"], str(cache)), None
        log.info("templates cache %s has another key; sampling again", cache)
    from metake_jax.templates import context_templates

    t = context_templates(cfg, params, tokenizer, seed=key["seed"], n_per_prompt=key["n_per_prompt"],
                          length=key["length"])
    t = [list(g) for g in t]
    return t, lambda: cache.write_text(json.dumps({"key": key, "templates": t}, indent=1))


def get_templates(c: Any, cfg: ModelConfig, params: Any, tokenizer: Any, run_dir: Path,
                  model_id: str) -> list[list[str]]:
    """Context templates (docs/FORMULAS.md §2): ``templates.file`` if given, else sampled once (seeded) and
    cached in ``run_dir/templates.json``."""
    t, write = _templates(c, cfg, params, tokenizer, run_dir, model_id)
    if write is not None:
        write()
    return t


def stats_cache_dir(c: Any) -> Path:
    """``stats.cache_dir``, or ``$METAKE_CACHE/stats`` (default ``~/.cache/metake-jax/stats``)."""
    d = _get(c, "stats.cache_dir", "")
    if d:
        return Path(str(d)).expanduser()
    return Path(os.environ.get("METAKE_CACHE") or "~/.cache/metake-jax").expanduser() / "stats"


def layer_statistics(c: Any, cfg: ModelConfig, params: Any, tokenizer: Any, model_id: str) -> jax.Array:
    """C0 (m, d_k, d_k) of the edited layers, cached (``metake_jax.stats.layer_stats``)."""
    from metake_jax.stats import CorpusSpec, layer_stats

    s = c.stats
    spec = CorpusSpec(kind=str(s.kind), name=str(s.name), config=_get(c, "stats.config"), split=str(s.split),
                      paths=tuple(str(Path(p).expanduser()) for p in (s.paths or ())), seed=int(s.seed))
    return layer_stats(cfg, params, tokenizer, tuple(int(l) for l in c.layers), spec,
                       n_samples=int(s.n_samples), max_len=int(s.max_len),
                       cache_dir=stats_cache_dir(c), model_id=model_id,
                       token_budget=int(_get(c, "stats.token_budget", 8192)),
                       precision=_stats_precision(c))


# Fingerprint fields added after run checkpoints already existed, with the value those older runs implied.
_ADDED_LATER: dict[str, Any] = {"stats.precision": "highest", "data.chat": False}
# Fingerprint entries older checkpoints did not record at all (not compared when absent from a checkpoint).
_RECORDED_LATER: tuple[str, ...] = ("data_sha256",)


def _stats_precision(c: Any) -> str:
    """``config.stats.precision`` (configs written before the field existed mean "highest")."""
    return str(_get(c, "stats.precision", _ADDED_LATER["stats.precision"]))


def _fingerprint(c: Any) -> dict[str, Any]:
    """The config fields that determine the edited weights (must match on resume)."""
    d = c.to_dict() if hasattr(c, "to_dict") else dict(c)
    keep = ("model", "dtype", "data", "method", "batch_size", "layers", "stage1", "editor", "metake", "stats",
            "templates", "seed")
    fp = json.loads(json.dumps({k: d.get(k) for k in keep}, default=str))
    if not str(fp.get("method", "")).startswith("metake"):
        fp.pop("metake", None)  # MetaKE fields do not change a MEMIT / AlphaEdit run
    fp["editor"] = _editor_fingerprint(fp.get("method"), fp.get("editor"))
    for path, default in _ADDED_LATER.items():  # at their defaults, later fields leave older checkpoints resumable
        *parents, leaf = path.split(".")
        node = fp
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(leaf) == default:
            del node[leaf]
    return fp


def _editor_fingerprint(method: Any, section: Any) -> Any:
    """The ``editor`` part of a fingerprint: the shared projector fields and the method's own editor
    section with every hyper-parameter filled in (other editors' sections cannot change the weights).

    Checkpoints written before the editor registry stored a flat section (``l2``, ``mom2_update_weight``,
    ``solve_dtype`` with None = the editor's default): it is read as the same editor's section."""
    if not isinstance(section, dict):
        return section
    try:
        name = resolve(str(method)).editor
    except ValueError:
        return section
    own = section.get(name)
    if own is None and "l2" in section:  # the flat pre-registry section
        own = {"l2": section.get("l2"), "mom2_update_weight": section.get("mom2_update_weight")}
        if section.get("solve_dtype") is not None:
            own["solve_dtype"] = section["solve_dtype"]
    defaults = editors.default_config()[name]
    full = {**defaults, **{k: v for k, v in dict(own or {}).items() if k in defaults and v is not None}}
    out = {k: section[k] for k in ("nullspace_threshold", "energy") if k in section}
    out[name] = json.loads(json.dumps(full, default=str))
    return out


def _resume_diff(fp: dict[str, Any], stored: dict[str, Any]) -> list[str]:
    """``_diff`` of a run's fingerprint against a checkpoint's, skipping entries it predates (and the
    MetaKE section that checkpoints of non-MetaKE runs stored before ``_fingerprint`` dropped it)."""
    stored = dict(stored)
    if not str(stored.get("method", "")).startswith("metake"):
        stored.pop("metake", None)
    if "editor" in stored:
        stored["editor"] = _editor_fingerprint(stored.get("method"), stored["editor"])
    return _diff({k: v for k, v in fp.items() if k in stored or k not in _RECORDED_LATER}, stored)


def _eval_cache_key(c: Any, model_id: str, data_sha: str, templates: Any, ids: Sequence[int]) -> dict[str, Any]:
    """What a cached evaluation of the unedited model depends on: model, dtype, seed, the data
    (config, content hash, case ids), chat mode, templates and the evaluation settings."""
    d = c.to_dict() if hasattr(c, "to_dict") else dict(c)
    ev = {k: v for k, v in (d.get("eval") or {}).items() if not k.startswith("glue")}
    key = {"model": d.get("model"), "model_id": model_id, "dtype": d.get("dtype"), "seed": d.get("seed"),
           "data": d.get("data"), "data_sha256": data_sha, "templates": templates, "eval": ev,
           "case_ids": list(ids)}
    return json.loads(json.dumps(key, default=str))


def _glue_cache_key(c: Any, model_id: str) -> dict[str, Any]:
    """What the base model's GLUE results depend on: model, dtype, seed and the GLUE settings."""
    d = c.to_dict() if hasattr(c, "to_dict") else dict(c)
    ev = {k: v for k, v in (d.get("eval") or {}).items() if k.startswith("glue") or k == "batch_size"}
    key = {"model": d.get("model"), "model_id": model_id, "dtype": d.get("dtype"), "seed": d.get("seed"), "eval": ev}
    return json.loads(json.dumps(key, default=str))


def _cached(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON at ``path`` if it was written under ``key``, else None (stale or absent)."""
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if stored.get("key") == key:
        return stored
    log.info("%s was computed for another model / data / settings: computing it again", path)
    return None


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: checkpoint {b!r} vs config {a!r}"]


# ============================================================================ evaluation


def _peak_memory() -> dict[str, float | None]:
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    dev = None
    try:
        st = jax.devices()[0].memory_stats()
        if st and "peak_bytes_in_use" in st:
            dev = st["peak_bytes_in_use"] / 2**20
    except Exception:  # noqa: BLE001 - not every backend has memory stats
        dev = None
    return {"peak_rss_mb": round(rss_mb, 1), "device_peak_mb": None if dev is None else round(dev, 1)}


def evaluate_cases(c: Any, kind: str, cfg: ModelConfig, params: Any, tokenizer: Any, cases: Sequence[Case], *,
                   pre_argmax: list | None = None, fluency: bool = False, seed: int = 0,
                   chat: ChatFormat | None = None) -> dict[str, Any]:
    """CounterFact or ZsRE metrics of ``cases`` on ``params`` (docs/FORMULAS.md §8); ``chat``: a
    ``tokens.ChatFormat`` (prompts wrapped in the chat template) or None."""
    from metake_jax.evaluate import evaluate_counterfact, evaluate_zsre

    bs = int(_get(c, "eval.batch_size", 32))
    if kind == "zsre":
        return evaluate_zsre(cfg, params, tokenizer, cases, batch_size=bs, pre_edit_argmax=pre_argmax, chat=chat)
    out = evaluate_counterfact(cfg, params, tokenizer, cases, batch_size=bs, chat=chat)
    if fluency:
        n = int(_get(c, "eval.fluency_cases", 0)) or len(cases)
        ref = _get(c, "eval.reference_stats", "") or None
        fl = evaluate_counterfact(cfg, params, tokenizer, list(cases)[:n], batch_size=bs, fluency=True,
                                  generation_seed=seed, max_out_len=int(c.eval.max_out_len), reference_stats=ref,
                                  chat=chat)
        out["summary"]["fluency"] = fl["summary"].get("fluency")
        out["summary"]["consistency"] = fl["summary"].get("consistency")
        out["summary"]["fluency_n_cases"] = n
        out["notes"].update({k: v for k, v in fl["notes"].items()})
        gens = {m["case_id"]: m.get("generations") for m in fl["per_case"]}
        flu = {m["case_id"]: m.get("fluency") for m in fl["per_case"]}
        for m in out["per_case"]:
            if m["case_id"] in gens:
                m["fluency"], m["generations"] = flu[m["case_id"]], gens[m["case_id"]]
    return out


def _glue_enabled(c: Any) -> bool:
    every = int(_get(c, "eval.glue_every", -1))
    d = _get(c, "eval.glue_dir", "")
    if every < 0:
        return False
    if not d or not Path(d).expanduser().is_dir():
        log.warning("GLUE evaluation skipped: directory %r not found (config.eval.glue_dir)", d)
        return False
    return True


def _glue(c: Any, cfg: ModelConfig, params: Any, tokenizer: Any) -> dict[str, Any]:
    from metake_jax.evaluate import evaluate_glue

    e = c.eval
    return evaluate_glue(cfg, params, tokenizer, data_dir=Path(e.glue_dir).expanduser(),
                         tasks=tuple(e.glue_tasks), n=int(e.glue_n), batch_size=int(e.batch_size),
                         generation=bool(e.glue_generation))


def _glue_summary(res: dict[str, Any] | None) -> dict[str, Any]:
    if not res:
        return {}
    keys = ("accuracy_new", "f1_new", "mcc_new", "accuracy", "f1", "mcc", "invalid")
    return {t: {k: r[k] for k in keys if k in r} for t, r in res["tasks"].items()}


def _batch_summary(kind: str, ev: dict[str, Any]) -> dict[str, Any]:
    s = ev["summary"]
    keys = ("efficacy", "generalization", "specificity", "score") if kind == "counterfact" else (
        "efficacy", "generalization", "specificity")
    return {k: s.get(k) for k in keys}


# ============================================================================ the run


def _set_edited_kernels(params: Any, layers: Sequence[int], kernels: Any) -> Any:
    """A copy of ``params`` whose fc_out kernels at ``layers`` are ``kernels`` (m, d_k, d)."""
    try:
        return with_w_out(params, tuple(layers), kernels)
    except ValueError as e:
        raise RunError(f"checkpoint kernels: {e} (another model?)") from e


def _edited_kernels(params: Any, layers: Sequence[int]) -> np.ndarray:
    return np.asarray(w_out(params, tuple(layers)))


def _progress(c: Any, total: int, initial: int, desc: str):
    if not bool(_get(c, "progress", True)):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="batch", dynamic_ncols=True)


def _json_dump(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default))
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (tuple, set)):
        return list(o)
    return str(o)


def run(c: Any, *, hooks: RunHooks | None = None) -> dict[str, Any]:
    """Run the sequential protocol for config ``c``; returns the results dict (also results.json).

    Every user error — config (``RunError``), data / request (``RequestError``,
    ``DataUnavailableError``), model (``ConversionError``), a checkpoint that does not match —
    is raised before anything is written to ``run_dir``.
    """
    hooks = hooks or RunHooks()
    t_start = time.perf_counter()
    run_dir = Path(str(c.run_dir)).expanduser().absolute()
    ecfg = edit_config(c)
    layers = ecfg.layers
    seed = int(_get(c, "seed", 0))
    resume = bool(_get(c, "resume", False))
    bs = int(c.batch_size)
    if bs < 1:
        raise RunError(f"config.batch_size must be >= 1, got {bs}")
    wall: dict[str, float] = {}

    # -- model, cases, templates: everything checked before the first write
    t = time.perf_counter()
    cfg, params, tok = load_model_spec(c.model, dtype=str(c.dtype), seed=seed, remat=bool(_get(c, "remat", False)))
    if max(layers) >= cfg.n_layers:
        raise RunError(f"config.layers={layers}: the model has {cfg.n_layers} layers")
    model_id = _get(c, "model_id") or model_id_for(c.model, cfg, seed, str(c.dtype))
    wall["load_model"] = time.perf_counter() - t
    log.info("model %s (%s, %d layers, d=%d, d_k=%d)", c.model, cfg.family, cfg.n_layers, cfg.d_model, cfg.d_ff)

    cases = load_run_cases(c, tok)
    chat = chat_of(c, tok)
    kind = cases[0].kind
    ids = [x.case_id for x in cases]
    batches = [cases[i:i + bs] for i in range(0, len(cases), bs)]
    log.info("%d %s cases in %d batches of <= %d; method %s%s", len(cases), kind, len(batches), bs, c.method,
             " (chat prompts)" if chat is not None else "")

    t = time.perf_counter()
    templates, write_templates = _templates(c, cfg, params, tok, run_dir, model_id)
    wall["templates"] = time.perf_counter() - t
    check_inputs(c, cfg, tok, cases, templates, chat)
    data_sha = cases_digest(cases)

    ckdir = run_dir / "checkpoints"
    fp = {**_fingerprint(c), "data_sha256": data_sha}
    restored = None
    if resume:
        step, old = None, RunCheckpointer(ckdir) if ckdir.is_dir() else None
        if old is not None:
            step = old.latest()
            arrays, meta = old.restore(step) if step is not None else (None, None)
            old.close()
        if step is None:
            log.warning("resume=True but no checkpoint in %s: starting from the base model", ckdir)
        else:
            bad = _resume_diff(fp, meta.get("fingerprint", {}))
            if bad:
                raise RunError("cannot resume from " + str(ckdir / str(step)) + ": the config differs from "
                               "the checkpointed run in " + "; ".join(bad[:6]))
            n_done = int(meta["n_done"])
            if meta["case_ids_done"] != ids[:n_done] or step != meta["batches_done"]:
                raise RunError(f"cannot resume from {ckdir / str(step)}: its edited case ids do not match "
                               "the selected cases")
            restored = (step, arrays, meta)

    # -- statistics (their cache lives outside run_dir)
    t = time.perf_counter()
    C0 = layer_statistics(c, cfg, params, tok, model_id)
    P, ranks = None, None
    if "P" in ecfg.editor.needs:
        from metake_jax.projector import projectors_for_layers

        energy = _get(c, "editor.energy")
        P, ranks = projectors_for_layers(C0, threshold=float(c.editor.nullspace_threshold),
                                         energy=None if energy is None else float(energy), layers=layers)
        ranks = [int(r) for r in ranks]
        log.info("null-space projector ranks %s of d_k=%d", ranks, cfg.d_ff)
    wall["statistics"] = time.perf_counter() - t
    log.info("templates %.1fs, statistics + projectors %.1fs", wall["templates"], wall["statistics"])
    state = init_state(params, cfg, layers, P=P, C0=C0 if "C0" in ecfg.editor.needs else None)
    del C0
    run_dir.mkdir(parents=True, exist_ok=True)  # the first write into run_dir: every input is checked
    if write_templates is not None:
        write_templates()

    # -- pre-edit evaluation and GLUE on the base model (cached in run_dir under the run's
    #    fingerprint: resume does not redo them, another model / data / setting does)
    pre_path, glue_base_path = run_dir / "eval_pre.json", run_dir / "glue" / "base.json"
    pre_argmax = None
    t = time.perf_counter()
    if kind == "zsre" and (bool(_get(c, "eval.final", True)) or bool(_get(c, "eval.batch", True))):
        from metake_jax.evaluate import neighborhood_argmax

        pre_argmax = neighborhood_argmax(cfg, params, tok, cases, batch_size=int(c.eval.batch_size), chat=chat)
    pre = None
    if bool(_get(c, "eval.pre", True)):
        pre_key = _eval_cache_key(c, model_id, data_sha, templates, ids)
        cached = _cached(pre_path, pre_key)
        if cached is not None:
            pre = cached["summary"]
        else:
            ev = evaluate_cases(c, kind, cfg, params, tok, cases, pre_argmax=pre_argmax,
                                fluency=bool(_get(c, "eval.fluency", False)), seed=seed, chat=chat)
            pre = ev["summary"]
            _json_dump(pre_path, {"key": pre_key, "case_ids": ids, **ev})
    glue_on = _glue_enabled(c)
    glue_base = None
    if glue_on:
        glue_key = _glue_cache_key(c, model_id)
        glue_base = _cached(glue_base_path, glue_key)
        if glue_base is None:
            glue_base_path.parent.mkdir(exist_ok=True)
            glue_base = {"key": glue_key, **_glue(c, cfg, params, tok)}
            _json_dump(glue_base_path, glue_base)
    wall["pre_eval"] = time.perf_counter() - t
    log.info("pre-edit evaluation%s: %.1fs", " + GLUE" if glue_on else "", wall["pre_eval"])

    # -- checkpoint: fresh or resume
    if not resume and ckdir.exists():
        log.info("resume=False: removing old checkpoints in %s", ckdir)
        shutil.rmtree(ckdir)
    ckpt = RunCheckpointer(ckdir, keep=int(_get(c, "keep_checkpoints", 2)))
    key = jax.random.PRNGKey(seed)
    batch_log: list[dict[str, Any]] = []
    glue_log: list[dict[str, Any]] = []
    if glue_on:
        glue_log.append({"batches": 0, "n_edits": 0, "tasks": _glue_summary(glue_base)})
    start = 0
    if restored is not None:
        step, arrays, meta = restored
        n_done = int(meta["n_done"])
        state = EditState(params=_set_edited_kernels(state.params, layers, arrays["kernels"]),
                          stats=state.stats._replace(Cp=jnp.asarray(arrays["Cp"])), n_edits=n_done)
        key = jnp.asarray(arrays["rng"], jnp.uint32)  # legacy uint32 PRNGKey data
        batch_log, glue_log, start = list(meta["batch_log"]), list(meta["glue_log"]), int(step)
        log.info("resumed from checkpoint %d (%d cases edited)", step, n_done)

    # -- the sequential edit loop
    bar = _progress(c, len(batches), start, f"{c.method} edits")
    every = int(_get(c, "eval.glue_every", -1))
    for b in range(start, len(batches)):
        reqs = [x.request for x in batches[b]]
        bids = [x.case_id for x in batches[b]]
        key, sub = jax.random.split(key)
        try:
            # every batch (the last, partial one too) is padded to the batch size: one compiled shape
            new_state, report = edit_batch(cfg, state, tok, reqs, templates, ecfg, n_pad=bs, chat=chat)
        except (EditError, RequestError) as e:
            if bar is not None:
                bar.close()
            raise RunError(f"batch {b + 1}/{len(batches)} (case ids {bids}) failed: {e}. Nothing of this batch "
                           f"was written; the run state after {b} batch(es) is in {ckdir} "
                           f"(fix the cause and rerun with --config.resume=True)") from e
        state = new_state
        entry: dict[str, Any] = {"batch": b + 1, "case_ids": bids, "n_edits": state.n_edits, **report.summary()}
        t = time.perf_counter()
        if bool(_get(c, "eval.batch", True)):
            sub_arg = None if pre_argmax is None else pre_argmax[b * bs:b * bs + len(bids)]
            entry["eval"] = _batch_summary(kind, evaluate_cases(c, kind, cfg, state.params, tok, batches[b],
                                                                pre_argmax=sub_arg, chat=chat))
        if glue_on and every > 0 and (b + 1) % every == 0:
            res = _glue(c, cfg, state.params, tok)
            _json_dump(run_dir / "glue" / f"after_batch{b + 1}.json", res)
            glue_log.append({"batches": b + 1, "n_edits": state.n_edits, "tasks": _glue_summary(res)})
        entry["timings"]["eval"] = round(time.perf_counter() - t, 4)
        entry.update(_peak_memory())
        batch_log.append(entry)
        t = time.perf_counter()
        ckpt.save(b + 1, {"kernels": _edited_kernels(state.params, layers), "Cp": np.asarray(state.stats.Cp),
                          "rng": np.asarray(key)},
                  {"batches_done": b + 1, "n_done": state.n_edits, "case_ids_done": ids[:b * bs + len(bids)],
                   "batch_log": batch_log, "glue_log": glue_log, "fingerprint": fp, "model_id": model_id,
                   "config": json.loads(c.to_json_best_effort()) if hasattr(c, "to_json_best_effort") else {}})
        entry["timings"]["checkpoint"] = round(time.perf_counter() - t, 4)
        if bar is not None:
            post = {"edits": state.n_edits, "s/batch": f"{report.timings['total']:.1f}"}
            if "eval" in entry and entry["eval"].get("efficacy") is not None:
                post["eff"] = f"{entry['eval']['efficacy']:.0f}"
            bar.set_postfix(post)
            bar.update(1)
        else:
            log.info("batch %d/%d: %d edits, %.1fs", b + 1, len(batches), state.n_edits, report.timings["total"])
        if hooks.after_checkpoint is not None:
            hooks.after_checkpoint(b + 1, state)
    if bar is not None:
        bar.close()
    ckpt.close()

    # -- final evaluation, results
    t = time.perf_counter()
    post = None
    if bool(_get(c, "eval.final", True)):
        ev = evaluate_cases(c, kind, cfg, state.params, tok, cases, pre_argmax=pre_argmax,
                            fluency=bool(_get(c, "eval.fluency", False)), seed=seed, chat=chat)
        post = ev["summary"]
        _json_dump(run_dir / "eval_post.json", {"case_ids": ids, **ev})
    if glue_on and (not glue_log or glue_log[-1]["batches"] != len(batches)):
        res = _glue(c, cfg, state.params, tok)
        _json_dump(run_dir / "glue" / "final.json", res)
        glue_log.append({"batches": len(batches), "n_edits": state.n_edits, "tasks": _glue_summary(res)})
    wall["final_eval"] = time.perf_counter() - t

    if _get(c, "export_hf", ""):
        from models.convert import export_hf

        t = time.perf_counter()
        out = export_hf(Path(str(c.export_hf)).expanduser(), cfg, state.params, tok)
        wall["export_hf"] = time.perf_counter() - t
        log.info("edited model exported to %s", out)

    wall["total"] = time.perf_counter() - t_start
    results = {
        "method": c.method, "model": str(c.model), "model_id": model_id, "kind": kind,
        "n_cases": len(cases), "batch_size": bs, "n_batches": len(batches), "layers": list(layers),
        "resumed_from_batch": start if bool(_get(c, "resume", False)) else None,
        "projector_ranks": ranks, "pre": pre, "post": post, "batches": batch_log, "glue": glue_log,
        "wall_s": {k: round(v, 2) for k, v in wall.items()}, "memory": _peak_memory(),
        "device": str(jax.devices()[0]), "config": json.loads(c.to_json_best_effort())
        if hasattr(c, "to_json_best_effort") else None,
    }
    _json_dump(run_dir / "results.json", results)
    with open(run_dir / "edit_log.jsonl", "w") as f:
        for e in batch_log:
            f.write(json.dumps({"batch": e["batch"], "case_ids": e["case_ids"], "n_edits": e["n_edits"]},
                               default=_json_default) + "\n")
    from metake_jax.report import write_plots, write_results_md

    write_results_md(run_dir / "results.md", results)
    try:
        write_plots(run_dir / "plots", results)
    except Exception as e:  # noqa: BLE001 - plots are a convenience; never lose a finished run over them
        log.warning("plots not written: %s", e)
    return results
