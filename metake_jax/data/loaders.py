"""Load edit cases from local benchmark files or a dataset hub id (docs/FORMULAS.md §8–§9, §R7).

Formats (auto-detected from the first record, or passed explicitly as ``fmt``):

* ``"rome"`` — ROME/MEMIT ``counterfact.json`` / ``multi_counterfact.json``: records with
  ``case_id`` and ``requested_rewrite`` = {prompt (template with ``{}``), subject,
  target_new {str, id}, target_true {str, id}, relation_id}, plus ``paraphrase_prompts``,
  ``neighborhood_prompts`` (answer: target_true), ``attribute_prompts``, ``generation_prompts``.
* ``"flat"`` — EasyEdit-style CounterFact: {case_id, prompt (subject filled in), target_new,
  subject, ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth}.  The template is
  the prompt with the *first* occurrence of the subject replaced by ``{}`` (so filling it gives the
  prompt back exactly); a subject absent from the prompt is an error.
* ``"zsre"`` — MEND-format zsRE: {subject, src, rephrase, answers, loc, loc_ans, ...}.  MEMIT/AE
  convention: template = src with the subject replaced by ``{}`` (first occurrence; the reference
  replaces every occurrence, identical on the bundled data where the subject occurs once),
  target_new = answers[0], target_true = None, case_id = record index.

Normalisation on load (what users write is not always what they mean): every string is put in
Unicode NFC (a subject typed with a combining diaeresis matches the prompt's "ë"); subjects and
targets lose surrounding whitespace (the key is read at the subject's last character; the space
before a target is decided by ``requests.join_target``).  Prompts keep their text: a trailing space
is handled by the join.  A filled prompt's template puts ``{}`` at the first occurrence of the
subject that is not glued to letters or digits (else the first occurrence).

Every record is validated; errors are ``RequestError`` naming the case id (``"index i"`` where the
record has no usable case id) and the field.  Within one file, two records with the same subject
and prompt but different ``target_new`` are refused by the runner (``requests.check_conflicts``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from metake_jax.errors import RequestError
from metake_jax.requests import Case, EditRequest, NeighborPrompt, normalize_text, not_found_message, validate_case

__all__ = [
    "DEMO_PATH", "FORMATS", "DataUnavailableError", "detect_format", "load_cases", "load_demo", "load_hub",
    "parse_records", "select",
]

FORMATS: tuple[str, ...] = ("rome", "flat", "zsre")
DEMO_PATH = Path(__file__).with_name("demo_counterfact.json")

_FLAT_KEYS = ("case_id", "prompt", "target_new", "subject", "ground_truth", "rephrase_prompt",
              "locality_prompt", "locality_ground_truth")
_ZSRE_KEYS = ("subject", "src", "rephrase", "answers", "loc", "loc_ans")


class DataUnavailableError(RuntimeError):
    """A data set cannot be obtained (offline hub, missing file); the message says what to pass."""


# ----------------------------------------------------------------------------- field helpers


def _get(rec: dict, key: str, cid: Any, where: str = "") -> Any:
    if key not in rec:
        raise RequestError(f"missing field {where + key!r}", case_id=cid, field=where + key)
    return rec[key]


def _str(rec: dict, key: str, cid: Any, where: str = "", *, blank_ok: bool = False, strip: bool = False) -> str:
    """A string field in NFC (``strip``: without surrounding whitespace)."""
    v = _get(rec, key, cid, where)
    if not isinstance(v, str):
        raise RequestError(f"{where + key} must be a string, got {type(v).__name__}", case_id=cid, field=where + key)
    if not blank_ok and not v.strip():
        raise RequestError(f"{where + key} is empty or whitespace: {v!r}", case_id=cid, field=where + key)
    v = normalize_text(v)
    return v.strip() if strip else v


def _str_list(rec: dict, key: str, cid: Any, *, required: bool = True, allow_empty: bool = True,
              allow_str: bool = False) -> tuple[str, ...]:
    if key not in rec and not required:
        return ()
    v = _get(rec, key, cid)
    if allow_str and isinstance(v, str):
        v = [v]
    if not isinstance(v, list):
        raise RequestError(f"{key} must be a list of strings, got {type(v).__name__}", case_id=cid, field=key)
    if not v and not allow_empty:
        raise RequestError(f"{key} is an empty list", case_id=cid, field=key)
    for i, s in enumerate(v):
        if not isinstance(s, str):
            raise RequestError(f"{key}[{i}] must be a string, got {type(s).__name__}", case_id=cid, field=f"{key}[{i}]")
        if not s.strip():
            raise RequestError(f"{key}[{i}] is empty or whitespace", case_id=cid, field=f"{key}[{i}]")
    return tuple(normalize_text(s) for s in v)


def _case_id(rec: dict, index: int) -> int:
    tag = f"index {index}"
    if "case_id" not in rec:
        raise RequestError("missing field 'case_id'", case_id=tag, field="case_id")
    cid = rec["case_id"]
    if isinstance(cid, bool) or not isinstance(cid, int):
        raise RequestError(f"case_id must be an int, got {cid!r} ({type(cid).__name__})", case_id=tag, field="case_id")
    if cid < 0:
        raise RequestError(f"case_id must be non-negative, got {cid}", case_id=tag, field="case_id")
    return cid


def _template_from_filled(prompt: str, subject: str, cid: Any, field: str) -> str:
    """Prompt with the subject filled in -> template: ``{}`` at the first occurrence of the subject
    not glued to a letter or digit (else the first occurrence), so filling it gives the prompt back."""
    if "{}" in prompt:
        return prompt  # already a template; validate_request checks it has exactly one "{}"
    if subject not in prompt:
        raise RequestError(not_found_message("subject", subject, field, prompt), case_id=cid, field="subject")
    starts = [i for i in range(len(prompt)) if prompt.startswith(subject, i)]

    def free(i: int) -> bool:
        j = i + len(subject)
        return not (i > 0 and prompt[i - 1].isalnum()) and not (j < len(prompt) and prompt[j].isalnum())

    i = next((i for i in starts if free(i)), starts[0])
    return prompt[:i] + "{}" + prompt[i + len(subject):]


def _dict(v: Any, cid: Any, field: str) -> dict:
    if not isinstance(v, dict):
        raise RequestError(f"{field} must be an object, got {type(v).__name__}", case_id=cid, field=field)
    return v


# ----------------------------------------------------------------------------- per-format parsers


def _parse_rome(rec: dict, index: int) -> Case:
    cid = _case_id(rec, index)
    rw = _dict(_get(rec, "requested_rewrite", cid), cid, "requested_rewrite")
    w = "requested_rewrite."
    prompt = _str(rw, "prompt", cid, w)
    subject = _str(rw, "subject", cid, w, strip=True)
    tn = _dict(_get(rw, "target_new", cid, w), cid, w + "target_new")
    tt = _dict(_get(rw, "target_true", cid, w), cid, w + "target_true")
    new = _str(tn, "str", cid, w + "target_new.", strip=True)
    true = _str(tt, "str", cid, w + "target_true.", strip=True)
    rid = rw.get("relation_id")
    req = EditRequest(case_id=cid, subject=subject, prompt=prompt, target_new=new, target_true=true)
    neighbors = _str_list(rec, "neighborhood_prompts", cid)
    return Case(
        request=req,
        kind="counterfact",
        paraphrase_prompts=_str_list(rec, "paraphrase_prompts", cid),
        neighborhood=tuple(NeighborPrompt(p, true) for p in neighbors),
        attribute_prompts=_str_list(rec, "attribute_prompts", cid, required=False),
        generation_prompts=_str_list(rec, "generation_prompts", cid, required=False),
        relation_id=rid if isinstance(rid, str) else None,
        target_new_id=tn.get("id") if isinstance(tn.get("id"), str) else None,
        target_true_id=tt.get("id") if isinstance(tt.get("id"), str) else None,
        source_format="rome",
    )


def _parse_flat(rec: dict, index: int) -> Case:
    cid = _case_id(rec, index)
    subject = _str(rec, "subject", cid, strip=True)
    prompt = _str(rec, "prompt", cid)
    new = _str(rec, "target_new", cid, strip=True)
    true = _str(rec, "ground_truth", cid, strip=True)
    template = _template_from_filled(prompt, subject, cid, "prompt")
    rephrase = _str_list(rec, "rephrase_prompt", cid, allow_empty=False, allow_str=True)
    loc = _str_list(rec, "locality_prompt", cid, allow_empty=False, allow_str=True)
    loc_gt = _str_list(rec, "locality_ground_truth", cid, allow_empty=False, allow_str=True)
    if len(loc_gt) == 1 and len(loc) > 1:
        loc_gt = loc_gt * len(loc)
    if len(loc_gt) != len(loc):
        raise RequestError(f"{len(loc)} locality prompts but {len(loc_gt)} ground truths", case_id=cid,
                           field="locality_ground_truth")
    req = EditRequest(case_id=cid, subject=subject, prompt=template, target_new=new, target_true=true)
    return Case(
        request=req,
        kind="counterfact",
        paraphrase_prompts=rephrase,
        neighborhood=tuple(NeighborPrompt(p, a) for p, a in zip(loc, loc_gt)),
        source_format="flat",
    )


def _parse_zsre(rec: dict, index: int) -> Case:
    cid = index
    subject = _str(rec, "subject", cid, strip=True)
    src = _str(rec, "src", cid)
    rephrase = _str(rec, "rephrase", cid)
    answers = _get(rec, "answers", cid)
    if not isinstance(answers, list):
        raise RequestError(f"answers must be a list of strings, got {type(answers).__name__}", case_id=cid, field="answers")
    if not answers:
        raise RequestError("answers is an empty list", case_id=cid, field="answers")
    answers_t = _str_list(rec, "answers", cid)
    loc = _str(rec, "loc", cid)
    loc_ans = _str(rec, "loc_ans", cid)
    req = EditRequest(case_id=cid, subject=subject, prompt=_template_from_filled(src, subject, cid, "src"),
                      target_new=answers_t[0].strip(), target_true=None)
    return Case(
        request=req,
        kind="zsre",
        paraphrase_prompts=(rephrase,),
        neighborhood=(NeighborPrompt(loc + "?", loc_ans),),
        loc=loc,
        loc_ans=loc_ans,
        source_format="zsre",
    )


_PARSERS: dict[str, Callable[[dict, int], Case]] = {"rome": _parse_rome, "flat": _parse_flat, "zsre": _parse_zsre}


# ----------------------------------------------------------------------------- public API


def detect_format(records: Sequence[Any]) -> str:
    """'rome' | 'flat' | 'zsre' from the keys of the first record; RequestError otherwise."""
    if not isinstance(records, list) or not records:
        raise RequestError("expected a non-empty list of records", case_id="(top level)", field="(top level)")
    rec = records[0]
    if not isinstance(rec, dict):
        raise RequestError(f"record must be an object, got {type(rec).__name__}", case_id="index 0", field="(record)")
    keys = set(rec)
    if "requested_rewrite" in keys:
        return "rome"
    if {"src", "answers"} <= keys:
        return "zsre"
    if {"prompt", "target_new", "ground_truth"} <= keys:
        return "flat"
    cid = rec.get("case_id", "index 0")
    raise RequestError(
        f"unknown record format (keys {sorted(keys)}); expected ROME (requested_rewrite), flat CounterFact "
        f"({', '.join(_FLAT_KEYS)}) or ZsRE MEND ({', '.join(_ZSRE_KEYS)})", case_id=cid, field="format")


def parse_records(records: Any, fmt: str = "auto", *, tokenizer: Any = None, source: str = "<records>") -> list[Case]:
    """Parse and validate every record; duplicate case ids are an error (naming both indices)."""
    if not isinstance(records, list):
        raise RequestError(f"{source}: top level must be a list of records, got {type(records).__name__}",
                           case_id="(top level)", field="(top level)")
    if not records:
        raise RequestError(f"{source}: no records", case_id="(top level)", field="(top level)")
    if fmt == "auto":
        fmt = detect_format(records)
    if fmt not in _PARSERS:
        raise RequestError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}", case_id="(top level)", field="format")
    parse = _PARSERS[fmt]
    cases: list[Case] = []
    seen: dict[int, int] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise RequestError(f"{source}: record must be an object, got {type(rec).__name__}",
                               case_id=f"index {i}", field="(record)")
        case = validate_case(parse(rec, i), tokenizer)
        if case.case_id in seen:
            raise RequestError(f"{source}: duplicate case_id (records {seen[case.case_id]} and {i})",
                               case_id=case.case_id, field="case_id")
        seen[case.case_id] = i
        cases.append(case)
    return cases


def select(cases: list[Case], n: int | None = None, seed: int | None = None) -> list[Case]:
    """First ``n`` cases (seed None) or a seeded random ``n`` (kept in file order)."""
    if n is None:
        return list(cases)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise RequestError(f"config.data.n must be a non-negative int, got {n!r}")
    if n > len(cases):
        raise RequestError(f"config.data.n={n}: asked for {n} cases but only {len(cases)} are available")
    if seed is None:
        return list(cases[:n])
    idx = np.sort(np.random.default_rng(seed).choice(len(cases), size=n, replace=False))
    return [cases[int(i)] for i in idx]


def load_cases(path: str | os.PathLike, fmt: str = "auto", *, n: int | None = None, seed: int | None = None,
               tokenizer: Any = None) -> list[Case]:
    """Load a local JSON file of records (any of ``FORMATS``), validate, then select ``n``."""
    p = Path(path)
    if p.is_dir():
        found = sorted(x.name for x in p.glob("*.json"))
        raise DataUnavailableError(f"{p} is a directory; pass one of its files: {found}")
    if not p.exists():
        raise DataUnavailableError(f"data file not found: {p}")
    try:
        records = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RequestError(f"{p}: not valid JSON ({e})", case_id="(top level)", field="(file)") from e
    return select(parse_records(records, fmt, tokenizer=tokenizer, source=str(p)), n, seed)


def load_demo(n: int | None = None, seed: int | None = None, tokenizer: Any = None) -> list[Case]:
    """The bundled project-written CounterFact-style demo set (flat format, ``DEMO_PATH``)."""
    return load_cases(DEMO_PATH, "flat", n=n, seed=seed, tokenizer=tokenizer)


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def load_hub(hub_id: str, *, split: str = "train", name: str | None = None, fmt: str = "auto",
             n: int | None = None, seed: int | None = None, tokenizer: Any = None) -> list[Case]:
    """Load records from a ``datasets`` hub id (online only; offline fails fast with a clear message)."""
    if _offline():
        raise DataUnavailableError(
            f"cannot load dataset {hub_id!r} from the hub: offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) "
            f"is set; download the JSON file and pass its path to load_cases instead")
    try:
        import datasets  # noqa: PLC0415 (heavy; only needed here)

        ds = datasets.load_dataset(hub_id, name, split=split)
    except Exception as e:  # network / missing repo: one clear error
        raise DataUnavailableError(f"cannot load dataset {hub_id!r} (split {split!r}) from the hub: {e}") from e
    records = [dict(r) for r in ds]
    return select(parse_records(records, fmt, tokenizer=tokenizer, source=f"hub:{hub_id}"), n, seed)
