"""EditRequest / Case validation and the leading-space convention (metake_jax/requests.py)."""
from __future__ import annotations

import dataclasses

import pytest

from metake_jax.errors import RequestError
from metake_jax.requests import Case, EditRequest, NeighborPrompt, fill_template, target_text, validate_case, validate_request


class WordTok:
    """Whitespace tokenizer over a fixed vocabulary; unknown words vanish (so some texts give no tokens)."""

    def __init__(self, words, bos=None):
        self.vocab = {w: i + 2 for i, w in enumerate(words)}
        self.bos = bos

    def __call__(self, text):
        ids = [self.vocab[w] for w in text.split() if w in self.vocab]
        return {"input_ids": ([self.bos] if self.bos is not None else []) + ids}


GOOD = EditRequest(case_id=3, subject="Danielle Darrieux", prompt="The mother tongue of {} is",
                   target_new="English", target_true="French")


def test_target_text_leading_space():
    assert target_text("Paris") == " Paris"
    assert target_text(" Paris") == " Paris"
    assert target_text("\tParis") == "\tParis"
    assert target_text("Paris").lstrip() == "Paris"
    with pytest.raises(TypeError):
        target_text(3)


def test_fill_template_is_inverse_of_subject_replacement():
    prompt = "The mother tongue of Danielle Darrieux is"
    template = prompt.replace("Danielle Darrieux", "{}", 1)
    assert fill_template(template, "Danielle Darrieux") == prompt
    # other braces are left alone (no str.format)
    assert fill_template("{x} of {} is", "S") == "{x} of S is"
    assert GOOD.text == "The mother tongue of Danielle Darrieux is"


def test_valid_request_passes_with_and_without_tokenizer():
    assert validate_request(GOOD) is GOOD
    tok = WordTok("The mother tongue of Danielle Darrieux is English French".split(), bos=1)
    assert validate_request(GOOD, tok) is GOOD
    assert validate_request(dataclasses.replace(GOOD, target_true=None)) is not None


BAD = [
    ("case_id", dict(case_id=-1)),
    ("case_id", dict(case_id="7")),
    ("case_id", dict(case_id=True)),
    ("prompt", dict(prompt="The mother tongue of is")),
    ("prompt", dict(prompt="{} and {} speak")),
    ("prompt", dict(prompt="{}")),
    ("prompt", dict(prompt=5)),
    ("subject", dict(subject="  ")),
    ("subject", dict(subject=None)),
    ("target_new", dict(target_new="")),
    ("target_new", dict(target_new="   ")),
    ("target_new", dict(target_new=["English"])),
    ("target_true", dict(target_true=" ")),
    ("target_new", dict(target_new="French")),
]


@pytest.mark.parametrize("field,change", BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_bad_request_names_case_and_field(field, change):
    req = dataclasses.replace(GOOD, **change)
    with pytest.raises(RequestError) as e:
        validate_request(req)
    assert e.value.field == field
    assert e.value.case_id == req.case_id
    assert field in str(e.value) and repr(req.case_id) in str(e.value)


def test_tokenizer_checks():
    tok = WordTok("The mother tongue of Danielle Darrieux is French".split())  # "English" unknown
    with pytest.raises(RequestError) as e:
        validate_request(GOOD, tok)
    assert e.value.field == "target_new" and "tokenizes to no tokens" in str(e.value)
    tok2 = WordTok("The mother tongue of is English French".split(), bos=1)  # subject words unknown
    with pytest.raises(RequestError) as e:
        validate_request(GOOD, tok2)
    assert e.value.field == "subject"


def test_case_validation():
    case = Case(request=GOOD, paraphrase_prompts=("Danielle Darrieux speaks",),
                neighborhood=(NeighborPrompt("Michel Rocard speaks", "French"),))
    assert validate_case(case) is case
    assert case.neighborhood_prompts == ("Michel Rocard speaks",)
    with pytest.raises(RequestError) as e:
        validate_case(dataclasses.replace(case, paraphrase_prompts=("ok", "")))
    assert e.value.field == "paraphrase_prompts[1]"
    with pytest.raises(RequestError) as e:
        validate_case(dataclasses.replace(case, kind="other"))
    assert e.value.field == "kind"
    z = Case(request=dataclasses.replace(GOOD, target_true=None), kind="zsre", loc="nq question: x", loc_ans="")
    with pytest.raises(RequestError) as e:
        validate_case(z)
    assert e.value.field == "loc_ans"
    with pytest.raises(RequestError) as e:
        validate_case(dataclasses.replace(case, request=dataclasses.replace(GOOD, target_true=None)))
    assert e.value.field == "target_true"


class TrailingSpaceTok:
    """Byte-level-BPE-like pieces: a word with its leading space, and a lone trailing space token."""

    def __init__(self, bos=None):
        self.bos = bos

    def __call__(self, text):
        import re

        ids = [hash(p) % 1000 + 2 for p in re.findall(r"\s?\S+|\s", text)]
        return {"input_ids": ([self.bos] if self.bos is not None else []) + ids}


@pytest.mark.parametrize("bos", [None, 1])
def test_subject_check_with_trailing_space_prefix(bos):
    """"The capital of " ends in a space token that " France" absorbs: the request is still valid."""
    tok = TrailingSpaceTok(bos)
    prefix = "The capital of "
    assert len(tok(prefix + "France")["input_ids"]) == len(tok(prefix)["input_ids"])  # the trap
    req = EditRequest(case_id=0, subject="France", prompt="The capital of {} is", target_new="Berlin",
                      target_true="Paris")
    assert validate_request(req, tok) is req
    start = EditRequest(case_id=1, subject="France", prompt="{} is", target_new="Berlin", target_true="Paris")
    assert validate_request(start, tok) is start
