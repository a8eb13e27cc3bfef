"""The sequential editing protocol (docs/FORMULAS.md §9, §R5 "Sequential protocol").

``run(config)`` validates the configuration once (``metake_jax.run_config.RunConfig``) and runs
five named stages, each a function with a typed input and output:

1. ``setup`` → ``RunSetup``: the model and tokenizer (``models.load.load_model``, incl.
   ``random:<family>[:<size>]``), the selected cases (``metake_jax.data.loaders``, file order), the
   context templates (docs/FORMULAS.md §2; sampled once, seeded, cached in ``run_dir/templates.json``,
   or ``templates.file``), every row tokenized up front, and on resume the checkpoint checked against
   the config — nothing is written;
2. ``statistics`` → ``EditState``, ranks: layer statistics C0 (``metake_jax.stats.layer_stats``,
   cached outside ``run_dir``) → projectors P (AlphaEdit / MetaKE) or C0 (MEMIT);
3. ``evaluate_base`` → ``BaseEval``: pre-edit evaluation of all cases and GLUE on the base model
   (cached in ``run_dir`` under the run's fingerprint);
4. ``stream`` → ``Stream``: the batches of ``batch_size`` cases through ``editor.edit_batch``, each on
   top of the last (C_p accumulates), a checkpoint after every batch (``metake_jax.checkpoint``),
   GLUE after every k batches, the just-edited batch's efficacy (cheap) for the edits-vs-metrics plot;
5. ``evaluate_final`` and ``outputs``: all cases on the final model; results.json, results.md, plots
   (``metake_jax.report``), optional HF export.

``resume=True`` restarts from the last checkpoint: the base model is loaded and the edited layers'
kernels and C_p are overwritten from the checkpoint, so the run ends with the same weights as an
uninterrupted one; no case is edited twice or skipped.  A batch that raises leaves the state
unchanged and stops the run with a ``RunError`` naming the batch and its case ids.  The stream is
deterministic (no RNG); checkpoints written before that change carry an unused ``rng`` array, which
``stream`` ignores.
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
from metake_jax.editor import EditConfig, EditState, edit_batch, evaluated_params, init_state
from metake_jax.errors import ConfigError, EditError, RequestError, RunError
from metake_jax.methods import methods, resolve
from metake_jax.requests import Case
from metake_jax.run_config import RunConfig
from metake_jax.tokens import ChatFormat, chat_format
from models.config import ModelConfig
from metake_jax.sharding import (
    any_process, barrier, describe_layout, enable_compile_cache, init_distributed, is_writer, leaf_placer, mesh_size,
    replicate, run_mesh, shard_params, shard_stats, to_host,
)
from models.interface import w_out, with_w_out

log = logging.getLogger(__name__)

METHODS = methods()  # from the editor registry (metake_jax.methods)

__all__ = [
    "BaseEval", "ConfigError", "METHODS", "RunConfig", "RunError", "RunHooks", "RunSetup", "Stream", "cases_digest",
    "chat_of", "check_inputs", "edit_config", "evaluate_base", "evaluate_final", "get_templates", "layer_statistics",
    "load_model_spec", "load_run_cases", "model_id_for", "outputs", "run", "setup", "statistics", "stats_cache_dir",
    "stream",
]


@dataclasses.dataclass
class RunHooks:
    """Callbacks for tests and tools. ``after_checkpoint(batches_done, state)`` runs right after
    each batch's checkpoint is written."""

    after_checkpoint: Callable[[int, EditState], None] | None = None


# ============================================================================ config → objects


def edit_config(c: RunConfig | Any) -> EditConfig:
    """``method`` + hyper-parameters → ``EditConfig`` (the method table: ``metake_jax.methods.resolve``,
    docs/FORMULAS.md §4, §6): the method's editor from ``editor.<name>``, its edited layers (the
    editor's own ``layers`` or the run's), Stage I (``stage1.norm_ref="auto"`` becomes the editor's
    ``stage1_norm_ref``: ROME / metake_rome get "mlp"), and the MetaKE section with the method's overrides.

    ``c``: a ``RunConfig`` or a ConfigDict (validated first).  Raises ``ConfigError`` naming the field
    (an unknown method included)."""
    rc = RunConfig.of(c)
    try:
        meth = resolve(rc.method)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    editor = getattr(rc.editor, meth.editor)
    metake = None
    if meth.metake is not None:
        try:
            metake = dataclasses.replace(rc.metake, **meth.metake)
        except ValueError as e:
            raise ConfigError(f"config.{e}") from e
    try:
        return EditConfig(layers=editor.edit_layers(rc.layers), stage1=rc.stage1, editor=editor, metake=metake,
                          measure=rc.eval.association)
    except ValueError as e:
        raise ConfigError(f"config.layers: {e}") from e


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
                    remat: bool = False, mesh: Any = None) -> tuple[ModelConfig, Any, Any]:
    """(cfg, params, tokenizer) for any model spec of ``configs/base.py`` (incl. ``random:...``).

    ``remat`` sets ``ModelConfig.remat`` (per-block rematerialization in backward passes); with a
    ``mesh`` the params are placed on it by the logical-axis rules (``sharding.shard_params``), leaves
    read from files straight into their shards."""
    from models.errors import ConversionError
    from models.load import RANDOM_PREFIX, load_model

    random = str(spec).startswith(RANDOM_PREFIX)
    try:
        cfg, params, tok = load_model(str(spec), dtype=dtype, seed=seed, place=leaf_placer(mesh))
        params = shard_params(params, mesh)
    except ConversionError as e:
        if not random:
            raise
        raise RunError(f"config.model={spec!r}: {e}") from e
    cfg = cfg.replace(remat=bool(remat))
    if tok is None and not random:
        raise RunError(f"config.model={spec!r}: no tokenizer found beside the checkpoint "
                       "(editing needs one: save it with tokenizer.save_pretrained into the model dir)")
    return cfg, params, tok


def load_run_cases(c: RunConfig | Any, tokenizer: Any) -> list[Case]:
    """The selected cases of ``config.data`` (validated against the tokenizer), in file order.

    Raises ``RequestError`` (bad record; two cases with the same subject and prompt but different
    target_new), ``DataUnavailableError`` (missing file) or ``RunError`` (nothing selected, mixed kinds).
    """
    from metake_jax.data.loaders import load_cases, load_demo
    from metake_jax.requests import check_conflicts

    d = RunConfig.of(c).data
    n, seed = d.n, d.seed
    if d.path in ("demo", ""):
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


def chat_of(c: RunConfig | Any, tokenizer: Any) -> ChatFormat | None:
    """``config.data.chat``: the tokenizer's ``ChatFormat`` (prompts wrapped in its chat template), or None."""
    if not RunConfig.of(c).data.chat:
        return None
    try:
        return chat_format(tokenizer)
    except ValueError as e:
        raise RunError(f"config.data.chat=True: {e}") from e


def cases_digest(cases: Sequence[Case]) -> str:
    """sha256 of the selected cases' content (every field, after the loaders' normalisation)."""
    blob = json.dumps([dataclasses.asdict(x) for x in cases], sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def check_inputs(c: RunConfig | Any, cfg: ModelConfig, tokenizer: Any, cases: Sequence[Case], templates: Sequence[Sequence[str]],
                 chat: ChatFormat | None = None) -> None:
    """Every row the run will build — each batch's rewriting rows with every context template, and
    every evaluation pair — tokenized up front (no model call): ``RequestError`` naming the case and
    field for a bad request or a row longer than ``cfg.max_positions``, before anything is written."""
    from metake_jax.batch import prepare_batch
    from metake_jax.evaluate.counterfact import counterfact_pairs
    from metake_jax.evaluate.zsre import zsre_pairs
    from metake_jax.tokens import PairError, encode_pairs

    bs = RunConfig.of(c).batch_size
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


def _templates(c: RunConfig, cfg: ModelConfig, params: Any, tokenizer: Any, run_dir: Path,
               model_id: str) -> tuple[list[list[str]], Callable[[], None] | None]:
    """(templates, write) — ``write`` stores newly sampled templates in ``run_dir/templates.json``
    (None when they came from a file or the cache); nothing is written here."""
    f = c.templates.file
    if f:
        p = Path(f).expanduser()
        if not p.is_file():
            raise RunError(f"config.templates.file: {p} not found")
        try:
            return _validate_templates(json.loads(p.read_text()), str(p)), None
        except json.JSONDecodeError as e:
            raise RunError(f"config.templates.file: {p} is not valid JSON ({e})") from e
    key = {"model_id": model_id, "seed": c.templates.seed, "n_per_prompt": c.templates.n_per_prompt,
           "length": c.templates.length}
    if c.templates.lengths:  # several lengths (ROME); absent otherwise, so older caches keep their key
        key["lengths"] = list(c.templates.lengths)
    cache = run_dir / "templates.json"
    cached = None
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("key") == key:
            cached = _validate_templates(stored["templates"], str(cache))
        else:
            log.info("templates cache %s has another key; sampling again", cache)
    if not any_process(cached is None):  # sampling is collective: all processes sample if one must
        return cached, None
    from metake_jax.templates import context_templates

    t = context_templates(cfg, params, tokenizer, seed=key["seed"], n_per_prompt=key["n_per_prompt"],
                          lengths=c.templates.group_lengths())
    t = [list(g) for g in t]
    return t, lambda: cache.write_text(json.dumps({"key": key, "templates": t}, indent=1))


def get_templates(c: RunConfig | Any, cfg: ModelConfig, params: Any, tokenizer: Any, run_dir: Path,
                  model_id: str) -> list[list[str]]:
    """Context templates (docs/FORMULAS.md §2): ``templates.file`` if given, else sampled once (seeded) and
    cached in ``run_dir/templates.json``."""
    t, write = _templates(RunConfig.of(c), cfg, params, tokenizer, run_dir, model_id)
    if write is not None:
        write()
    return t


def stats_cache_dir(c: RunConfig | Any) -> Path:
    """``stats.cache_dir``, or ``$METAKE_CACHE/stats`` (default ``~/.cache/metake-jax/stats``)."""
    d = RunConfig.of(c).stats.cache_dir
    return Path(str(d)).expanduser() if d else cache_root() / "stats"


def cache_root() -> Path:
    """``$METAKE_CACHE`` (default ``~/.cache/metake-jax``): the root of the caches outside the repo (WORKSPACE.md)."""
    return Path(os.environ.get("METAKE_CACHE") or "~/.cache/metake-jax").expanduser()


def compile_cache_dir(c: RunConfig | Any) -> str:
    """``compile_cache``: "auto" → ``$METAKE_CACHE/xla`` (default ``~/.cache/metake-jax/xla``), "off" / "" → ""
    (no persistent compilation cache), else that directory."""
    v = RunConfig.of(c).compile_cache
    if v in ("off", ""):
        return ""
    return str(cache_root() / "xla" if v == "auto" else Path(v).expanduser())


def layer_statistics(c: RunConfig | Any, cfg: ModelConfig, params: Any, tokenizer: Any, model_id: str,
                     mesh: Any = None) -> jax.Array:
    """C0 (m, d_k, d_k) of the edited layers (``edit_config(c).layers``: the method's editor's own
    ``layers`` or the run's), cached (``metake_jax.stats.layer_stats``); with a ``mesh`` the documents
    are split over its ``data`` axis."""
    from metake_jax.stats import CorpusSpec, layer_stats

    c = RunConfig.of(c)
    s = c.stats
    spec = CorpusSpec(kind=s.kind, name=s.name, config=s.config, split=s.split,
                      paths=tuple(str(Path(p).expanduser()) for p in s.paths), seed=s.seed)
    return layer_stats(cfg, params, tokenizer, edit_config(c).layers, spec, n_samples=s.n_samples, max_len=s.max_len,
                       cache_dir=stats_cache_dir(c), model_id=model_id, token_budget=s.token_budget,
                       precision=s.precision, mesh=mesh)


# Fingerprint fields added after run checkpoints already existed, with the value those older runs implied
# (a field added to a fingerprinted section of run_config.RunConfig goes here to keep old runs resumable).
_ADDED_LATER: dict[str, Any] = {"stats.precision": "highest", "data.chat": False,
                                "stage1.prefix_reuse": True, "stage1.compact": True, "stage1.norm_ref": "block",
                                "templates.lengths": []}
# Fingerprint entries older checkpoints did not record at all (not compared when absent from a checkpoint).
_RECORDED_LATER: tuple[str, ...] = ("data_sha256",)


def _fingerprint(c: RunConfig | Any) -> dict[str, Any]:
    """The config fields that determine the edited weights (must match on resume), in the ConfigDict
    layout older checkpoints stored; a field missing from ``c`` counts at its default."""
    d = RunConfig.of(c).to_dict()
    keep = ("model", "dtype", "data", "method", "batch_size", "layers", "stage1", "editor", "metake", "stats",
            "templates", "seed")
    fp = json.loads(json.dumps({k: d.get(k) for k in keep}, default=str))
    if not str(fp.get("method", "")).startswith("metake"):
        fp.pop("metake", None)  # MetaKE fields do not change a MEMIT / AlphaEdit run
    fp["editor"] = _editor_fingerprint(fp.get("method"), fp.get("editor"))
    _resolve_norm_ref(fp)
    for path, default in _ADDED_LATER.items():  # at their defaults, later fields leave older checkpoints resumable
        *parents, leaf = path.split(".")
        node = fp
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(leaf) == default:
            del node[leaf]
    return fp


def _resolve_norm_ref(fp: dict[str, Any]) -> None:
    """``stage1.norm_ref="auto"`` in a fingerprint → the method's editor's convention (what the run computes:
    a ROME run from before ROME's own norm reference does not resume under it)."""
    s1 = fp.get("stage1")
    if isinstance(s1, dict) and s1.get("norm_ref") == "auto":
        try:
            s1["norm_ref"] = editors.get(resolve(str(fp.get("method"))).editor).stage1_norm_ref
        except ValueError:
            pass


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


def _eval_cache_key(c: RunConfig | Any, model_id: str, data_sha: str, templates: Any, ids: Sequence[int]) -> dict[str, Any]:
    """What a cached evaluation of the unedited model depends on: model, dtype, seed, the data
    (config, content hash, case ids), chat mode, templates and the evaluation settings."""
    d = RunConfig.of(c).to_dict()
    ev = {k: v for k, v in d["eval"].items() if not k.startswith("glue")}
    key = {"model": d.get("model"), "model_id": model_id, "dtype": d.get("dtype"), "seed": d.get("seed"),
           "data": d.get("data"), "data_sha256": data_sha, "templates": templates, "eval": ev,
           "case_ids": list(ids)}
    return json.loads(json.dumps(key, default=str))


def _glue_cache_key(c: RunConfig | Any, model_id: str) -> dict[str, Any]:
    """What the base model's GLUE results depend on: model, dtype, seed and the GLUE settings."""
    d = RunConfig.of(c).to_dict()
    ev = {k: v for k, v in d["eval"].items() if k.startswith("glue") or k == "batch_size"}
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


def evaluate_cases(c: RunConfig | Any, kind: str, cfg: ModelConfig, params: Any, tokenizer: Any, cases: Sequence[Case], *,
                   pre_argmax: list | None = None, fluency: bool = False, seed: int = 0,
                   chat: ChatFormat | None = None) -> dict[str, Any]:
    """CounterFact or ZsRE metrics of ``cases`` on ``params`` (docs/FORMULAS.md §8); ``chat``: a
    ``tokens.ChatFormat`` (prompts wrapped in the chat template) or None."""
    from metake_jax.evaluate import evaluate_counterfact, evaluate_zsre

    e = RunConfig.of(c).eval
    bs = e.batch_size
    if kind == "zsre":
        return evaluate_zsre(cfg, params, tokenizer, cases, batch_size=bs, pre_edit_argmax=pre_argmax, chat=chat)
    out = evaluate_counterfact(cfg, params, tokenizer, cases, batch_size=bs, chat=chat)
    if fluency:
        n = e.fluency_cases or len(cases)
        fl = evaluate_counterfact(cfg, params, tokenizer, list(cases)[:n], batch_size=bs, fluency=True,
                                  generation_seed=seed, max_out_len=e.max_out_len,
                                  reference_stats=e.reference_stats or None,
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


def _glue_enabled(c: RunConfig) -> bool:
    """``eval.glue_every`` >= 0 and ``eval.glue_dir`` present (a warning says when it is absent)."""
    d = c.eval.glue_dir
    if c.eval.glue_every < 0:
        return False
    if not d or not Path(d).expanduser().is_dir():
        log.warning("GLUE evaluation skipped: directory %r not found (config.eval.glue_dir)", d)
        return False
    return True


def _glue(c: RunConfig, cfg: ModelConfig, params: Any, tokenizer: Any) -> dict[str, Any]:
    from metake_jax.evaluate import evaluate_glue

    e = c.eval
    return evaluate_glue(cfg, params, tokenizer, data_dir=Path(e.glue_dir).expanduser(), tasks=e.glue_tasks,
                         n=e.glue_n, batch_size=e.batch_size, generation=e.glue_generation)


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


# ============================================================================ the run, in stages


def _progress(c: RunConfig, total: int, initial: int, desc: str):
    if not c.progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="batch", dynamic_ncols=True)


def _json_dump(path: Path, obj: Any) -> None:
    if not is_writer():  # multi-process runs: process 0 writes the run files
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default))
    os.replace(tmp, path)


def _digest(obj: Any) -> str:
    """sha256 of ``obj`` as sorted JSON (log lines that show every process of a run got the same)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()[:16]


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


def _config_json(c: RunConfig) -> dict[str, Any]:
    """The run's config as JSON data (results.json, checkpoint meta), in the ConfigDict layout."""
    return json.loads(json.dumps(c.to_dict(), default=_json_default))


@dataclasses.dataclass(frozen=True)
class Restored:
    """The checkpoint a resumed run continues from (checked against the config in ``setup``)."""

    step: int  # batches done
    n_done: int  # cases done
    kernels: np.ndarray  # (m, d_key, d_model) edited layers' fc_out kernels
    Cp: np.ndarray  # (m, d_key, d_key)
    batch_log: list[dict[str, Any]]
    glue_log: list[dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class RunSetup:
    """Everything the run needs before its first write: the output of ``setup``."""

    config: RunConfig
    edit: EditConfig
    run_dir: Path
    cfg: ModelConfig
    params: Any
    tokenizer: Any
    model_id: str
    cases: list[Case]
    batches: list[list[Case]]  # consecutive batches of ≤ batch_size cases
    chat: ChatFormat | None
    templates: list[list[str]]
    write_templates: Callable[[], None] | None  # stores newly sampled templates (None: nothing to store)
    data_sha: str  # cases_digest(cases)
    fingerprint: dict[str, Any]  # what a checkpoint must match to be resumed
    restored: Restored | None  # the checkpoint to continue from (resume=True and one exists)
    wall: dict[str, float]  # seconds per part (load_model, templates, …): each stage adds its own entry
    mesh: Any = None  # the run's device mesh (sharding.run_mesh from config.mesh)

    @property
    def kind(self) -> str:
        return self.cases[0].kind  # "counterfact" | "zsre"

    @property
    def ids(self) -> list[Any]:
        return [x.case_id for x in self.cases]

    @property
    def ckdir(self) -> Path:
        return self.run_dir / "checkpoints"


def _restore(c: RunConfig, ckdir: Path, fp: dict[str, Any], ids: list[Any]) -> Restored | None:
    """The latest checkpoint in ``ckdir`` if it matches the config and cases (RunError otherwise)."""
    old = RunCheckpointer(ckdir) if ckdir.is_dir() else None
    step = None
    if old is not None:
        step = old.latest()
        arrays, meta = old.restore(step) if step is not None else (None, None)
        old.close()
    if step is None:
        log.warning("resume=True but no checkpoint in %s: starting from the base model", ckdir)
        return None
    bad = _resume_diff(fp, meta.get("fingerprint", {}))
    if bad:
        raise RunError("cannot resume from " + str(ckdir / str(step)) + ": the config differs from "
                       "the checkpointed run in " + "; ".join(bad[:6]))
    n_done = int(meta["n_done"])
    if meta["case_ids_done"] != ids[:n_done] or step != meta["batches_done"]:
        raise RunError(f"cannot resume from {ckdir / str(step)}: its edited case ids do not match the selected cases")
    # arrays["rng"] of older checkpoints (a key the stream never used) is ignored
    return Restored(step=int(step), n_done=n_done, kernels=arrays["kernels"], Cp=arrays["Cp"],
                    batch_log=list(meta["batch_log"]), glue_log=list(meta["glue_log"]))


def _init_distributed(c: RunConfig) -> None:
    """``config.distributed`` (or the JAX_* environment) → ``jax.distributed.initialize``.

    In a multi-process run every process runs every stage — statistics (each process group feeds
    its slice of the documents), evaluation, text generation (templates, a model-sampled corpus,
    fluency) and the HF export — as the same jitted functions on the same global arrays; host
    reads go through ``sharding.to_host``, so every process ends with the same numbers and texts;
    process 0 alone writes the run files.  Raises ``ConfigError`` naming the field for an
    incomplete ``distributed`` section."""
    d = c.distributed
    try:
        init_distributed(d.coordinator, d.num_processes, d.process_id, d.auto)
    except ValueError as e:
        raise ConfigError(f"config.{e}") from e


def _run_mesh(c: RunConfig):
    """The run's mesh from ``config.mesh`` (``sharding.run_mesh``; −1 = the rest of the devices)."""
    try:
        return run_mesh(c.mesh.data, c.mesh.model)
    except ValueError as e:
        raise ConfigError(f"config.{e}") from e


def setup(c: RunConfig) -> RunSetup:
    """Stage 1: model, cases, templates, every input row, and (resume) the checkpoint — all checked
    before anything is written.  Raises ``RunError`` / ``ConfigError``, ``RequestError``,
    ``DataUnavailableError``, ``ConversionError``."""
    wall: dict[str, float] = {}
    ecfg = edit_config(c)
    run_dir = Path(c.run_dir).expanduser().absolute()
    t = time.perf_counter()
    mesh = _run_mesh(c)
    cfg, params, tok = load_model_spec(c.model, dtype=c.dtype, seed=c.seed, remat=c.remat, mesh=mesh)
    if max(ecfg.layers) >= cfg.n_layers:
        field = "layers" if ecfg.editor.layers is None else f"editor.{ecfg.editor.name}.layers"
        raise ConfigError(f"config.{field}={ecfg.layers}: the model has {cfg.n_layers} layers")
    try:
        ecfg.editor.check_model(cfg)  # e.g. SPHERE's stored layout of fc_out
    except ValueError as e:
        raise ConfigError(f"config.{e}") from e
    model_id = c.model_id or model_id_for(c.model, cfg, c.seed, c.dtype)
    wall["load_model"] = time.perf_counter() - t
    log.info("model %s (%s, %d layers, d=%d, d_k=%d)", c.model, cfg.family, cfg.n_layers, cfg.d_model, cfg.d_ff)
    log.info("%s", describe_layout(params, mesh))

    cases = load_run_cases(c, tok)
    chat = chat_of(c, tok)
    bs = c.batch_size
    batches = [cases[i:i + bs] for i in range(0, len(cases), bs)]
    log.info("%d %s cases in %d batches of <= %d; method %s%s", len(cases), cases[0].kind, len(batches), bs,
             c.method, " (chat prompts)" if chat is not None else "")

    t = time.perf_counter()
    templates, write_templates = _templates(c, cfg, params, tok, run_dir, model_id)
    wall["templates"] = time.perf_counter() - t
    log.info("context templates sha256 %s", _digest(templates))  # the same on every process of a run
    check_inputs(c, cfg, tok, cases, templates, chat)
    data_sha = cases_digest(cases)
    fp = {**_fingerprint(c), "data_sha256": data_sha}
    ids = [x.case_id for x in cases]
    restored = _restore(c, run_dir / "checkpoints", fp, ids) if c.resume else None
    return RunSetup(config=c, edit=ecfg, run_dir=run_dir, cfg=cfg, params=params, tokenizer=tok, model_id=model_id,
                    cases=cases, batches=batches, chat=chat, templates=templates, write_templates=write_templates,
                    data_sha=data_sha, fingerprint=fp, restored=restored, wall=wall, mesh=mesh)


def statistics(s: RunSetup) -> tuple[EditState, list[int] | None]:
    """Stage 2: C0 of the edited layers (cached outside ``run_dir``) → the fresh ``EditState`` with the
    statistics the editor ``needs`` (P and / or C0; C_p = 0) and the projector ranks (None without P)."""
    c = s.config
    t = time.perf_counter()
    C0 = layer_statistics(c, s.cfg, s.params, s.tokenizer, s.model_id, mesh=s.mesh)
    P, ranks = None, None
    if "P" in s.edit.editor.needs:
        from metake_jax.projector import projectors_for_layers

        P, r = projectors_for_layers(C0, threshold=c.editor.nullspace_threshold, energy=c.editor.energy,
                                     layers=s.edit.layers, mesh=s.mesh)
        ranks = [int(x) for x in r]
        log.info("null-space projector ranks %s of d_k=%d", ranks, s.cfg.d_ff)
    s.wall["statistics"] = time.perf_counter() - t
    log.info("templates %.1fs, statistics + projectors %.1fs", s.wall["templates"], s.wall["statistics"])
    state = init_state(s.params, s.cfg, s.edit.layers, P=P, C0=C0 if "C0" in s.edit.editor.needs else None)
    state = state._replace(stats=jax.tree.map(lambda x: shard_stats(x, s.mesh), state.stats))  # C0, P, C_p row-sharded
    return state, ranks


@dataclasses.dataclass(frozen=True)
class BaseEval:
    """The unedited model's results: the output of ``evaluate_base``."""

    pre: dict[str, Any] | None  # summary of all cases (None: eval.pre=False)
    pre_argmax: list | None  # ZsRE: the base model's neighborhood argmax tokens (specificity reference)
    glue_base: dict[str, Any] | None  # GLUE on the base model (None: GLUE off)


def evaluate_base(s: RunSetup) -> BaseEval:
    """Stage 3: pre-edit evaluation and GLUE on the base model, cached in ``run_dir`` under the run's
    fingerprint (resume does not redo them; another model / data / setting does)."""
    c, t = s.config, time.perf_counter()
    pre_path, glue_base_path = s.run_dir / "eval_pre.json", s.run_dir / "glue" / "base.json"
    pre_argmax = None
    if s.kind == "zsre" and (c.eval.final or c.eval.batch):
        from metake_jax.evaluate import neighborhood_argmax

        pre_argmax = neighborhood_argmax(s.cfg, s.params, s.tokenizer, s.cases, batch_size=c.eval.batch_size,
                                         chat=s.chat)
    pre = None
    if c.eval.pre:
        pre_key = _eval_cache_key(c, s.model_id, s.data_sha, s.templates, s.ids)
        cached = _cached(pre_path, pre_key)
        if not any_process(cached is None):  # evaluation is collective: all processes run it if one must
            pre = cached["summary"]
        else:
            ev = evaluate_cases(c, s.kind, s.cfg, s.params, s.tokenizer, s.cases, pre_argmax=pre_argmax,
                                fluency=c.eval.fluency, seed=c.seed, chat=s.chat)
            pre = ev["summary"]
            log.info("pre-edit evaluation sha256 %s", _digest(ev))  # the same on every process of a run
            _json_dump(pre_path, {"key": pre_key, "case_ids": s.ids, **ev})
    glue_base = None
    if _glue_enabled(c):
        glue_key = _glue_cache_key(c, s.model_id)
        glue_base = _cached(glue_base_path, glue_key)
        if any_process(glue_base is None):
            glue_base_path.parent.mkdir(exist_ok=True)
            glue_base = {"key": glue_key, **_glue(c, s.cfg, s.params, s.tokenizer)}
            _json_dump(glue_base_path, glue_base)
    s.wall["pre_eval"] = time.perf_counter() - t
    log.info("pre-edit evaluation%s: %.1fs", " + GLUE" if glue_base is not None else "", s.wall["pre_eval"])
    return BaseEval(pre=pre, pre_argmax=pre_argmax, glue_base=glue_base)


@dataclasses.dataclass(frozen=True)
class Stream:
    """The edited state after the last batch: the output of ``stream``."""

    state: EditState
    batch_log: list[dict[str, Any]]  # one entry per batch (case ids, timings, losses, efficacy)
    glue_log: list[dict[str, Any]]  # GLUE summaries: base, every k batches
    start: int  # batches restored from the checkpoint (0: fresh run)


def stream(s: RunSetup, state: EditState, base: BaseEval, hooks: RunHooks | None = None) -> Stream:
    """Stage 4: the sequential batches on top of ``state`` (or of the restored checkpoint), a checkpoint
    after each; raises ``RunError`` naming the batch that failed (the state before it is kept)."""
    c, hooks, layers, bs = s.config, hooks or RunHooks(), s.edit.layers, s.config.batch_size
    if not c.resume and s.ckdir.exists() and is_writer():
        log.info("resume=False: removing old checkpoints in %s", s.ckdir)
        shutil.rmtree(s.ckdir)
    barrier("checkpoint-dir")
    ckpt = RunCheckpointer(s.ckdir, keep=c.keep_checkpoints)
    glue_on = base.glue_base is not None
    batch_log: list[dict[str, Any]] = []
    glue_log: list[dict[str, Any]] = [{"batches": 0, "n_edits": 0, "tasks": _glue_summary(base.glue_base)}] \
        if glue_on else []
    start = 0
    if s.restored is not None:
        r = s.restored
        try:
            params = with_w_out(state.params, layers, replicate(r.kernels, s.mesh))
        except ValueError as e:
            raise RunError(f"checkpoint kernels: {e} (another model?)") from e
        state = EditState(params=params, stats=state.stats._replace(Cp=shard_stats(r.Cp, s.mesh)), n_edits=r.n_done)
        batch_log, glue_log, start = list(r.batch_log), list(r.glue_log), r.step
        log.info("resumed from checkpoint %d (%d cases edited)", r.step, r.n_done)

    n = len(s.batches)
    n_pad = -(-bs // mesh_size(s.mesh)) * mesh_size(s.mesh)  # request rows split evenly over the "data" axis
    bar = _progress(c, n, start, f"{c.method} edits")
    for b in range(start, n):
        reqs = [x.request for x in s.batches[b]]
        bids = [x.case_id for x in s.batches[b]]
        try:
            # every batch (the last, partial one too) is padded to the batch size (rounded up to a
            # multiple of the mesh's data axis): one compiled shape
            new_state, report = edit_batch(s.cfg, state, s.tokenizer, reqs, s.templates, s.edit, n_pad=n_pad,
                                           chat=s.chat)
        except (EditError, RequestError) as e:
            if bar is not None:
                bar.close()
            raise RunError(f"batch {b + 1}/{n} (case ids {bids}) failed: {e}. Nothing of this batch "
                           f"was written; the run state after {b} batch(es) is in {s.ckdir} "
                           f"(fix the cause and rerun with --config.resume=True)") from e
        state = new_state
        entry: dict[str, Any] = {"batch": b + 1, "case_ids": bids, "n_edits": state.n_edits, **report.summary()}
        t = time.perf_counter()
        ev_params = _evaluated(s, state)  # the editor's readout (PRUNE: restrained); the stream keeps state.params
        if c.eval.batch:
            sub_arg = None if base.pre_argmax is None else base.pre_argmax[b * bs:b * bs + len(bids)]
            entry["eval"] = _batch_summary(s.kind, evaluate_cases(c, s.kind, s.cfg, ev_params, s.tokenizer,
                                                                  s.batches[b], pre_argmax=sub_arg, chat=s.chat))
        if glue_on and c.eval.glue_every > 0 and (b + 1) % c.eval.glue_every == 0:
            res = _glue(c, s.cfg, ev_params, s.tokenizer)
            _json_dump(s.run_dir / "glue" / f"after_batch{b + 1}.json", res)
            glue_log.append({"batches": b + 1, "n_edits": state.n_edits, "tasks": _glue_summary(res)})
        entry["timings"]["eval"] = round(time.perf_counter() - t, 4)
        entry.update(_peak_memory())
        batch_log.append(entry)
        t = time.perf_counter()
        ckpt.save(b + 1, {"kernels": to_host(w_out(state.params, layers)), "Cp": to_host(state.stats.Cp)},
                  {"batches_done": b + 1, "n_done": state.n_edits, "case_ids_done": s.ids[:b * bs + len(bids)],
                   "batch_log": batch_log, "glue_log": glue_log, "fingerprint": s.fingerprint,
                   "model_id": s.model_id, "config": _config_json(c)})
        entry["timings"]["checkpoint"] = round(time.perf_counter() - t, 4)
        if bar is not None:
            post = {"edits": state.n_edits, "s/batch": f"{report.timings['total']:.1f}"}
            if "eval" in entry and entry["eval"].get("efficacy") is not None:
                post["eff"] = f"{entry['eval']['efficacy']:.0f}"
            bar.set_postfix(post)
            bar.update(1)
        else:
            log.info("batch %d/%d: %d edits, %.1fs", b + 1, n, state.n_edits, report.timings["total"])
        if hooks.after_checkpoint is not None:
            hooks.after_checkpoint(b + 1, state)
    if bar is not None:
        bar.close()
    ckpt.close()
    return Stream(state=state, batch_log=batch_log, glue_log=glue_log, start=start)


def _evaluated(s: RunSetup, state: EditState) -> Any:
    """The weights every evaluation and the HF export read: ``Editor.readout`` of the stream's edited
    kernels against the unedited ones (PRUNE's restraint, docs/FORMULAS.md §B2); the stream's own
    params for every other editor."""
    return evaluated_params(state.params, s.params, s.edit.layers, s.edit.editor)


def evaluate_final(s: RunSetup, st: Stream, base: BaseEval) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Stage 5a: all cases on the final model (``eval_post.json``) and the final GLUE point →
    (post summary or None, the GLUE log with the final point)."""
    c, t, glue_log = s.config, time.perf_counter(), list(st.glue_log)
    post = None
    final_params = _evaluated(s, st.state)
    if c.eval.final:
        ev = evaluate_cases(c, s.kind, s.cfg, final_params, s.tokenizer, s.cases, pre_argmax=base.pre_argmax,
                            fluency=c.eval.fluency, seed=c.seed, chat=s.chat)
        post = ev["summary"]
        log.info("final evaluation sha256 %s", _digest(ev))  # the same on every process of a run
        _json_dump(s.run_dir / "eval_post.json", {"case_ids": s.ids, **ev})
    if base.glue_base is not None and (not glue_log or glue_log[-1]["batches"] != len(s.batches)):
        res = _glue(c, s.cfg, final_params, s.tokenizer)
        _json_dump(s.run_dir / "glue" / "final.json", res)
        glue_log.append({"batches": len(s.batches), "n_edits": st.state.n_edits, "tasks": _glue_summary(res)})
    s.wall["final_eval"] = time.perf_counter() - t
    return post, glue_log


def outputs(s: RunSetup, st: Stream, base: BaseEval, post: dict[str, Any] | None, glue_log: list[dict[str, Any]],
            ranks: list[int] | None, t_start: float) -> dict[str, Any]:
    """Stage 5b: optional HF export, results.json, edit_log.jsonl, results.md and plots → the results dict."""
    c = s.config
    if c.export_hf:
        from models.convert import export_hf

        t = time.perf_counter()
        host = jax.tree.map(to_host, _evaluated(s, st.state))  # every process takes part in the gathers
        out = Path(c.export_hf).expanduser()
        if is_writer():
            out = export_hf(out, s.cfg, host, s.tokenizer)
        del host
        barrier("export-hf")
        s.wall["export_hf"] = time.perf_counter() - t
        log.info("edited model exported to %s", out)
    s.wall["total"] = time.perf_counter() - t_start
    results = {
        "method": c.method, "model": c.model, "model_id": s.model_id, "kind": s.kind,
        "n_cases": len(s.cases), "batch_size": c.batch_size, "n_batches": len(s.batches), "layers": list(s.edit.layers),
        "resumed_from_batch": st.start if c.resume else None,
        "projector_ranks": ranks, "pre": base.pre, "post": post, "batches": st.batch_log, "glue": glue_log,
        "wall_s": {k: round(v, 2) for k, v in s.wall.items()}, "memory": _peak_memory(),
        "device": str(jax.devices()[0]), "config": _config_json(c),
    }
    _json_dump(s.run_dir / "results.json", results)
    if not is_writer():
        return results
    with open(s.run_dir / "edit_log.jsonl", "w") as f:
        for e in st.batch_log:
            line = {k: e[k] for k in ("batch", "case_ids", "n_edits", "beta", "gamma", "planned_norm") if k in e}
            f.write(json.dumps(line, default=_json_default) + "\n")
    from metake_jax.report import write_plots, write_results_md

    write_results_md(s.run_dir / "results.md", results)
    try:
        write_plots(s.run_dir / "plots", results)
    except Exception as e:  # noqa: BLE001 - plots are a convenience; never lose a finished run over them
        log.warning("plots not written: %s", e)
    return results


def run(config: RunConfig | Any, *, hooks: RunHooks | None = None) -> dict[str, Any]:
    """Run the sequential protocol for ``config`` (a RunConfig or a ConfigDict, validated once); returns
    the results dict (also results.json).

    Every user error — config (``ConfigError`` / ``RunError``), data / request (``RequestError``,
    ``DataUnavailableError``), model (``ConversionError``), a checkpoint that does not match —
    is raised before anything is written to ``run_dir``.
    """
    t_start = time.perf_counter()
    c = RunConfig.of(config)
    _init_distributed(c)
    if jax.process_count() == 1:  # a multi-process run compiles in every process: a program cached by another
        enable_compile_cache(compile_cache_dir(c))  # topology (same device count) aborted a gloo collective
    s = setup(c)
    state, ranks = statistics(s)
    s.run_dir.mkdir(parents=True, exist_ok=True)  # the first write into run_dir: every input is checked
    if s.write_templates is not None and is_writer():
        s.write_templates()
    base = evaluate_base(s)
    st = stream(s, state, base, hooks)
    post, glue_log = evaluate_final(s, st, base)
    return outputs(s, st, base, post, glue_log, ranks, t_start)
