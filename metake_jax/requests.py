"""Edit requests and evaluation cases (docs/FORMULAS.md §1 notation: subject s, prompt p(s), targets o*/o).

* ``EditRequest``: what an editor consumes — a prompt *template* with ``{}`` exactly once where
  the subject goes, the subject, the new target ``o*`` (``target_new``) and the old one ``o``
  (``target_true``; None for ZsRE, whose reference placeholder is ``"<|endoftext|>"``).
* ``Case``: a request plus the material the benchmarks evaluate it on (docs/FORMULAS.md §8).

Prompt + target, ONE rule (``join_target``), used by Stage I rows, keys, the CounterFact / ZsRE
scores and the generation prompts: the text is what a user would have typed, and the tokenizer
sees it whole.  Targets are stored *without* surrounding whitespace (as in the data files);

* trailing spaces/tabs of a prompt belong to the answer (``"… is "`` + ``"Latin"`` is read as
  ``"… is"`` + ``" Latin"``: byte-level BPE glues a space to the following word);
* one space separates prompt and target, except after a line break (chat templates end in
  ``"\n"``), an opening bracket or quote, or a character of a script written without spaces (CJK,
  kana, Thai, …): ``"日本の首都は"`` + ``"東京"`` has no space;
* in chat mode (``chat``: a ``tokens.ChatFormat``) the prompt is wrapped in the tokenizer's chat
  template first, so the target is the assistant's answer.

``target_text`` (one leading space, always) is the reference convention kept for the GLUE prompts,
which reproduce the reference's ``f"{prompt} {answer}"`` texts.
"""
from __future__ import annotations

import dataclasses
import unicodedata
from typing import Any, Iterable, Literal

from metake_jax.errors import RequestError
from metake_jax.tokens import ChatFormat, encode_pairs, fill, subject_last_index

__all__ = [
    "Case", "EditRequest", "NeighborPrompt", "check_conflicts", "check_request", "fill_template", "join_target",
    "needs_space", "normalize_text", "not_found_message", "prompt_text", "target_text", "validate_request",
    "validate_case",
]

Kind = Literal["counterfact", "zsre"]
KINDS: tuple[str, ...] = ("counterfact", "zsre")

fill_template = fill  # put ``subject`` at the single ``{}`` (plain replace: other braces stay)

_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_SPACELESS_SCRIPTS = ("THAI ", "LAO ", "KHMER ", "MYANMAR ", "TIBETAN ")


def normalize_text(s: str) -> str:
    """Unicode NFC (composed characters): identical-looking strings compare equal after it."""
    return unicodedata.normalize("NFC", s)


def target_text(s: str) -> str:
    """A target as a continuation: one leading space unless it already starts with whitespace
    (the reference convention; used by the GLUE prompts)."""
    if not isinstance(s, str):
        raise TypeError(f"target must be a string, got {type(s).__name__}")
    return s if s[:1].isspace() else " " + s


def _spaceless(ch: str) -> bool:
    """True for characters of scripts written without spaces between words (CJK, kana, fullwidth
    punctuation, Thai, Lao, Khmer, Myanmar, Tibetan); Hangul is written with spaces."""
    name = unicodedata.name(ch, "")
    if unicodedata.east_asian_width(ch) in ("W", "F"):
        return not name.startswith("HANGUL")
    return name.startswith(_SPACELESS_SCRIPTS)


def needs_space(prefix: str, target: str) -> bool:
    """Whether a space separates ``prefix`` and ``target`` in running text (see the module docstring)."""
    if not prefix or not target:
        return False
    a, b = prefix[-1], target[0]
    if a.isspace() or b.isspace() or _spaceless(a):
        return False
    return unicodedata.category(a) not in ("Ps", "Pi")  # "(" / "“" open: the target follows directly


def prompt_text(prompt: str, chat: ChatFormat | None = None) -> str:
    """The text the model reads for a user's ``prompt`` (template or filled): trailing spaces and
    tabs removed (they belong to the answer), then wrapped by ``chat`` (a ``ChatFormat``) if given."""
    end = len(prompt)
    while end and prompt[end - 1].isspace() and prompt[end - 1] not in _LINE_BREAKS:
        end -= 1
    text = prompt[:end]
    return chat.wrap(text) if chat is not None else text


def join_target(prompt: str, target: str, chat: ChatFormat | None = None) -> tuple[str, str]:
    """(prefix, continuation) texts for ``target`` answering ``prompt`` — THE join of this project.

    ``prefix = prompt_text(prompt, chat)``; ``continuation`` = the target without surrounding
    whitespace, after one space when ``needs_space(prefix, target)``.  ``prefix + continuation`` is
    the user's text; ``tokens.encode_pairs`` turns the pair into token ids.  Raises ValueError for
    a blank target.
    """
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"target must be a non-blank string, got {target!r}")
    prefix = prompt_text(prompt, chat)
    body = target.strip()
    return prefix, (" " if needs_space(prefix, body) else "") + body


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
    """An edit request with its evaluation material (docs/FORMULAS.md §8, §R7).

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


def not_found_message(what: str, needle: str, where: str, hay: str) -> str:
    """Why ``needle`` is not in ``hay``, with ascii() of both (identical-looking strings differ)."""
    msg = f"{what} {ascii(needle)} not found in {where} {ascii(hay)}"
    if normalize_text(needle) in normalize_text(hay):
        msg += " (they differ only in Unicode normalisation: NFC both, e.g. unicodedata.normalize('NFC', s))"
    return msg


def check_request(req: Any) -> None:
    """Field checks of one request-like object (case_id, subject, prompt, target_new, optional
    target_true); raise ``RequestError`` naming its case id and the offending field.

    Rules: case_id a non-negative int; prompt a non-empty string with ``{}`` exactly once;
    subject a non-blank string without leading/trailing whitespace (the key is read at its last
    character), found in the filled prompt; target_new a non-blank string; target_true None or a
    non-blank string different from target_new.
    """
    cid = getattr(req, "case_id", None)
    if isinstance(cid, bool) or not isinstance(cid, int) or cid < 0:
        raise RequestError(f"case_id must be a non-negative int, got {cid!r}", case_id=cid, field="case_id")
    prompt, subject = getattr(req, "prompt", None), getattr(req, "subject", None)
    if not isinstance(prompt, str):
        raise RequestError(f"prompt must be a string, got {type(prompt).__name__}", case_id=cid, field="prompt")
    if not prompt.replace("{}", "").strip():
        raise RequestError(f"prompt is empty: {prompt!r}", case_id=cid, field="prompt")
    n = prompt.count("{}")
    if n != 1:
        raise RequestError(
            f"prompt template must contain '{{}}' exactly once (found {n}): {prompt!r}", case_id=cid, field="prompt"
        )
    if not isinstance(subject, str):
        raise RequestError(f"subject must be a string, got {type(subject).__name__}", case_id=cid, field="subject")
    if not subject.strip():
        raise RequestError(f"subject is empty: {subject!r}", case_id=cid, field="subject")
    if subject != subject.strip():
        raise RequestError(f"subject {ascii(subject)} has leading/trailing whitespace; the key is read at the "
                           "subject's last character (strip it; the data loaders do)", case_id=cid, field="subject")
    for name in ("target_new", "target_true"):
        v = getattr(req, name, None)
        if v is None and name == "target_true":
            continue
        if not isinstance(v, str):
            raise RequestError(f"{name} must be a string, got {type(v).__name__}", case_id=cid, field=name)
        if not v.strip():
            raise RequestError(f"{name} is empty or whitespace: {v!r}", case_id=cid, field=name)
    true = getattr(req, "target_true", None)
    if true is not None and req.target_new.strip() == true.strip():
        raise RequestError(
            f"target_new equals target_true ({req.target_new!r}): nothing to edit", case_id=cid, field="target_new"
        )


def validate_request(req: EditRequest, tokenizer: Any = None) -> EditRequest:
    """Check one request (``check_request``); raise ``RequestError`` naming its case id and field.

    With a tokenizer also: each target adds >= 1 token after the prompt (``join_target`` +
    ``encode_pairs``), and a token covers the subject's last character (``subject_last_index``,
    docs/FORMULAS.md §2).
    """
    cid = getattr(req, "case_id", None)
    if not isinstance(req, EditRequest):
        raise RequestError(f"expected an EditRequest, got {type(req).__name__}", case_id=cid, field="request")
    check_request(req)
    if tokenizer is not None:
        for name in ("target_new", "target_true"):
            v = getattr(req, name)
            if v is None:
                continue
            try:
                encode_pairs(tokenizer, *map(lambda x: [x], join_target(req.text, v)))
            except ValueError as e:
                raise RequestError(f"{name} {v!r} tokenizes to no tokens after the prompt ({e})",
                                   case_id=cid, field=name) from e
        subject_last_index(tokenizer, prompt_text(req.prompt), req.subject, case_id=cid)
    return req


def check_conflicts(requests: Iterable[Any]) -> None:
    """Refuse two requests with the same subject and prompt but different ``target_new`` in one
    run (a least-squares write would store a compromise of both): ``RequestError`` naming the
    later case id, field ``target_new``, and the earlier case id."""
    seen: dict[tuple[str, str], Any] = {}
    for r in requests:
        key = (r.subject, prompt_text(fill(r.prompt, r.subject)))
        first = seen.setdefault(key, r)
        if first is not r and first.target_new.strip() != r.target_new.strip():
            raise RequestError(
                f"same subject {r.subject!r} and prompt {key[1]!r} as case_id={first.case_id!r} but a different "
                f"target_new ({first.target_new!r} vs {r.target_new!r}); one run cannot hold both edits",
                case_id=r.case_id, field="target_new")


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
