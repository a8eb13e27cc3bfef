"""Edit requests and evaluation cases (METHOD.md §1 notation: subject s, prompt p(s), targets o*/o).

* ``EditRequest``: what an editor consumes — a prompt *template* with ``{}`` exactly once where
  the subject goes, the subject, the new target ``o*`` (``target_new``) and the old one ``o``
  (``target_true``; None for ZsRE, whose reference placeholder is ``"<|endoftext|>"``).
* ``Case``: a request plus the material the benchmarks evaluate it on (METHOD.md §8).

Leading-space convention (REFERENCE.md §7): targets are stored *without* a leading space (as in
the data files) and ``target_text`` prepends exactly one space where a target is used as a
continuation of a prompt.  It is applied in one place per consumer: the scorers in
``metake_jax/evaluate`` (counterfact.py, zsre.py, glue.py) and, for editing, by the editor when it
builds the target token ids (``target_text(req.target_new)``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

from metake_jax.errors import RequestError

__all__ = ["Case", "EditRequest", "NeighborPrompt", "fill_template", "target_text", "validate_request", "validate_case"]

Kind = Literal["counterfact", "zsre"]
KINDS: tuple[str, ...] = ("counterfact", "zsre")


def target_text(s: str) -> str:
    """A target as a continuation: one leading space unless it already starts with whitespace."""
    if not isinstance(s, str):
        raise TypeError(f"target must be a string, got {type(s).__name__}")
    return s if s[:1].isspace() else " " + s


def fill_template(template: str, subject: str) -> str:
    """Put ``subject`` at the single ``{}`` (plain replace: other braces in the text stay as they are)."""
    return template.replace("{}", subject, 1)


@dataclasses.dataclass(frozen=True)
class EditRequest:
    """One requested rewrite (s, r, o -> o*).  ``prompt`` is a template containing ``{}`` once."""

    case_id: int
    subject: str
    prompt: str
    target_new: str
    target_true: str | None = None

    @property
    def text(self) -> str:
        """The prompt with the subject filled in, p(s)."""
        return fill_template(self.prompt, self.subject)


@dataclasses.dataclass(frozen=True)
class NeighborPrompt:
    """A locality prompt with the answer the unedited model should keep giving."""

    prompt: str
    answer: str


@dataclasses.dataclass(frozen=True)
class Case:
    """An edit request with its evaluation material (METHOD.md §8, REFERENCE.md §7).

    CounterFact: ``neighborhood`` answers are ``target_true`` (ROME format) or
    ``locality_ground_truth`` (flat format).  ZsRE: ``paraphrase_prompts = (rephrase,)``,
    ``neighborhood = (NeighborPrompt(loc + "?", loc_ans),)`` (the reference neighborhood prompt is
    ``loc + "?"`` followed by the tokens of ``" " + loc_ans``), and ``loc``/``loc_ans`` kept raw.
    ``generation_prompts`` is empty for the flat CounterFact format (no generation prompts there).
    """

    request: EditRequest
    kind: str = "counterfact"
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood: tuple[NeighborPrompt, ...] = ()
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    relation_id: str | None = None
    target_new_id: str | None = None
    target_true_id: str | None = None
    loc: str | None = None
    loc_ans: str | None = None
    source_format: str = ""

    @property
    def case_id(self) -> int:
        return self.request.case_id

    @property
    def neighborhood_prompts(self) -> tuple[str, ...]:
        return tuple(n.prompt for n in self.neighborhood)


def _is_nonempty_str(x: Any) -> bool:
    return isinstance(x, str) and x.strip() != ""


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def _n_target_tokens(tokenizer: Any, target: str) -> int:
    """Tokens a continuation adds: full(" x") minus a BOS the tokenizer prepends (BOS-aware)."""
    ids = _encode(tokenizer, target_text(target))
    empty = _encode(tokenizer, "")
    return len(ids) - len(empty) if ids[: len(empty)] == empty else len(ids)


def validate_request(req: EditRequest, tokenizer: Any = None) -> EditRequest:
    """Check one request; raise ``RequestError`` naming its case id and the offending field.

    Rules: case_id a non-negative int; prompt a non-empty string with ``{}`` exactly once;
    subject a non-blank string found in the filled prompt; target_new a non-blank string;
    target_true None or a non-blank string different from target_new.  With a tokenizer: each
    target tokenizes (with its leading space) to >= 1 token and the subject adds >= 1 token after
    the template prefix (so its last-token position exists, METHOD.md §2).
    """
    cid = getattr(req, "case_id", None)
    if not isinstance(req, EditRequest):
        raise RequestError(f"expected an EditRequest, got {type(req).__name__}", case_id=cid, field="request")
    if isinstance(cid, bool) or not isinstance(cid, int) or cid < 0:
        raise RequestError(f"case_id must be a non-negative int, got {cid!r}", case_id=cid, field="case_id")
    if not isinstance(req.prompt, str):
        raise RequestError(f"prompt must be a string, got {type(req.prompt).__name__}", case_id=cid, field="prompt")
    if not req.prompt.replace("{}", "").strip():
        raise RequestError(f"prompt is empty: {req.prompt!r}", case_id=cid, field="prompt")
    n = req.prompt.count("{}")
    if n != 1:
        raise RequestError(
            f"prompt template must contain '{{}}' exactly once (found {n}): {req.prompt!r}", case_id=cid, field="prompt"
        )
    if not isinstance(req.subject, str):
        raise RequestError(f"subject must be a string, got {type(req.subject).__name__}", case_id=cid, field="subject")
    if not req.subject.strip():
        raise RequestError(f"subject is empty: {req.subject!r}", case_id=cid, field="subject")
    if req.subject not in req.text:
        raise RequestError(f"subject {req.subject!r} not found in prompt {req.text!r}", case_id=cid, field="subject")
    for name in ("target_new", "target_true"):
        v = getattr(req, name)
        if v is None and name == "target_true":
            continue
        if not isinstance(v, str):
            raise RequestError(f"{name} must be a string, got {type(v).__name__}", case_id=cid, field=name)
        if not v.strip():
            raise RequestError(f"{name} is empty or whitespace: {v!r}", case_id=cid, field=name)
    if req.target_true is not None and req.target_new.strip() == req.target_true.strip():
        raise RequestError(
            f"target_new equals target_true ({req.target_new!r}): nothing to edit", case_id=cid, field="target_new"
        )
    if tokenizer is not None:
        for name in ("target_new", "target_true"):
            v = getattr(req, name)
            if v is not None and _n_target_tokens(tokenizer, v) < 1:
                raise RequestError(f"{name} {v!r} tokenizes to no tokens", case_id=cid, field=name)
        # compare with the prefix WITHOUT its trailing space: BPE tokenizers give "of " a trailing
        # space token that " France" absorbs (the reference strips it too, ROME get_words_idxs)
        prefix = req.prompt[: req.prompt.index("{}")]
        if len(_encode(tokenizer, prefix + req.subject)) <= len(_encode(tokenizer, prefix.rstrip())):
            raise RequestError(
                f"subject {req.subject!r} adds no tokens after the prompt prefix {prefix!r}", case_id=cid, field="subject"
            )
    return req


def _check_str_tuple(value: Any, cid: Any, field: str, *, allow_empty: bool = True) -> None:
    if not isinstance(value, tuple):
        raise RequestError(f"{field} must be a tuple of strings, got {type(value).__name__}", case_id=cid, field=field)
    if not allow_empty and not value:
        raise RequestError(f"{field} is empty", case_id=cid, field=field)
    for i, s in enumerate(value):
        if not _is_nonempty_str(s):
            raise RequestError(f"{field}[{i}] must be a non-empty string, got {s!r}", case_id=cid, field=f"{field}[{i}]")


def validate_case(case: Case, tokenizer: Any = None) -> Case:
    """Validate a case's request and its evaluation material (same error convention)."""
    validate_request(case.request, tokenizer)
    cid = case.case_id
    if case.kind not in KINDS:
        raise RequestError(f"kind must be one of {KINDS}, got {case.kind!r}", case_id=cid, field="kind")
    for field in ("paraphrase_prompts", "attribute_prompts", "generation_prompts"):
        _check_str_tuple(getattr(case, field), cid, field)
    if not isinstance(case.neighborhood, tuple):
        raise RequestError("neighborhood must be a tuple", case_id=cid, field="neighborhood")
    for i, nb in enumerate(case.neighborhood):
        if not isinstance(nb, NeighborPrompt) or not _is_nonempty_str(nb.prompt) or not _is_nonempty_str(nb.answer):
            raise RequestError(f"neighborhood[{i}] is not a (prompt, answer) pair of non-empty strings: {nb!r}",
                               case_id=cid, field=f"neighborhood[{i}]")
    if case.kind == "zsre":
        if case.request.target_true is not None:
            raise RequestError("ZsRE requests have no target_true", case_id=cid, field="target_true")
        for field in ("loc", "loc_ans"):
            if not _is_nonempty_str(getattr(case, field)):
                raise RequestError(f"{field} must be a non-empty string", case_id=cid, field=field)
    elif case.request.target_true is None:
        raise RequestError("CounterFact requests need target_true", case_id=cid, field="target_true")
    return case
