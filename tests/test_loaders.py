"""Benchmark loaders: real files (skipped when absent), fixtures, >= 20 malformed-record kinds, demo set."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from metake_jax.data import DEMO_PATH, DataUnavailableError, detect_format, load_cases, load_demo, load_hub, parse_records, select
from metake_jax.errors import RequestError
from metake_jax.requests import fill_template

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"benchmark data not found at {DATA}")

ROME = {
    "case_id": 7, "pararel_idx": 1,
    "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id": "P103",
                          "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French", "id": "Q150"},
                          "subject": "Danielle Darrieux"},
    "paraphrase_prompts": ["Shayna does this. Danielle Darrieux speaks", "Danielle Darrieux's native language is"],
    "neighborhood_prompts": ["Michel Rocard is a native speaker of", "Jean Gabin spoke the language"],
    "attribute_prompts": ["J.R.R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}
FLAT = {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
        "subject": "Danielle Darrieux", "ground_truth": "French",
        "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
        "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}
ZSRE = {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "pred": "uniform",
        "rephrase": "What will be the product of UniFirst?", "alt": "unmanned aircraft", "answers": ["uniform"],
        "loc": "nq question: john goodman's character in the big lebowski", "loc_ans": "Walter Sobchak",
        "cond": "x"}


def _records(base, n=3):
    out = []
    for i in range(n):
        r = copy.deepcopy(base)
        if "case_id" in r:
            r["case_id"] = i
        out.append(r)
    return out


def test_fixture_formats_and_fields(tmp_path):
    for base, fmt in ((ROME, "rome"), (FLAT, "flat"), (ZSRE, "zsre")):
        p = tmp_path / f"{fmt}.json"
        p.write_text(json.dumps(_records(base)))
        cases = load_cases(p)
        assert [c.case_id for c in cases] == [0, 1, 2]
        assert all(c.source_format == fmt for c in cases)
    rome = load_cases(tmp_path / "rome.json")[0]
    assert rome.request.prompt == ROME["requested_rewrite"]["prompt"]
    assert rome.request.target_true == "French" and rome.relation_id == "P103" and rome.target_new_id == "Q1860"
    assert rome.paraphrase_prompts == tuple(ROME["paraphrase_prompts"])
    assert [n.answer for n in rome.neighborhood] == ["French", "French"]
    assert rome.generation_prompts == tuple(ROME["generation_prompts"])
    flat = load_cases(tmp_path / "flat.json")[0]
    assert flat.request.prompt == "The mother tongue of {} is"
    assert flat.request.text == FLAT["prompt"]
    assert flat.neighborhood[0].prompt == FLAT["locality_prompt"] and flat.neighborhood[0].answer == "French"
    z = load_cases(tmp_path / "zsre.json")[0]
    assert z.kind == "zsre" and z.request.target_true is None and z.request.target_new == "uniform"
    assert z.request.prompt == "What is the product made by {}?"
    assert z.neighborhood[0].prompt == ZSRE["loc"] + "?" and z.neighborhood[0].answer == "Walter Sobchak"


def test_selection(tmp_path):
    recs = _records(FLAT, 20)
    cases = parse_records(recs)
    assert [c.case_id for c in select(cases, 5)] == [0, 1, 2, 3, 4]
    a, b, c = select(cases, 6, seed=1), select(cases, 6, seed=1), select(cases, 6, seed=2)
    assert [x.case_id for x in a] == [x.case_id for x in b]
    assert [x.case_id for x in a] != [x.case_id for x in c]
    ids = [x.case_id for x in a]
    assert ids == sorted(ids) and len(set(ids)) == 6 and set(ids) <= set(range(20))
    with pytest.raises(ValueError, match="only 20"):
        select(cases, 21)
    p = tmp_path / "f.json"
    p.write_text(json.dumps(recs))
    assert [x.case_id for x in load_cases(p, n=6, seed=1)] == ids


def _set(path, value):
    def f(r):
        d = r
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
        return r
    return f


def _del(path):
    def f(r):
        d = r
        for k in path[:-1]:
            d = d[k]
        del d[path[-1]]
        return r
    return f


# (kind, base record, mutation of record 1 (or of the whole list), expected case id, expected field)
MALFORMED = [
    ("missing field", FLAT, _del(["subject"]), 1, "subject"),
    ("wrong type", FLAT, _set(["target_new"], 5), 1, "target_new"),
    ("empty subject", FLAT, _set(["subject"], ""), 1, "subject"),
    ("empty target", FLAT, _set(["target_new"], ""), 1, "target_new"),
    ("whitespace-only target", FLAT, _set(["ground_truth"], "  \t"), 1, "ground_truth"),
    ("subject not in prompt", FLAT, _set(["subject"], "Edith Piaf"), 1, "subject"),
    ("{} missing", ROME, _set(["requested_rewrite", "prompt"], "The mother tongue is"), 1, "prompt"),
    ("{} twice", ROME, _set(["requested_rewrite", "prompt"], "{} and {} speak"), 1, "prompt"),
    ("target_new == target_true", FLAT, _set(["target_new"], "French"), 1, "target_new"),
    ("non-list paraphrases", ROME, _set(["paraphrase_prompts"], "Danielle speaks"), 1, "paraphrase_prompts"),
    ("non-string paraphrase item", ROME, _set(["paraphrase_prompts"], ["ok", 3]), 1, "paraphrase_prompts[1]"),
    ("duplicate case_id", FLAT, _set(["case_id"], 0), 0, "case_id"),
    ("negative case_id", FLAT, _set(["case_id"], -4), "index 1", "case_id"),
    ("non-int case_id", FLAT, _set(["case_id"], "1"), "index 1", "case_id"),
    ("bool case_id", FLAT, _set(["case_id"], True), "index 1", "case_id"),
    ("missing case_id", ROME, _del(["case_id"]), "index 1", "case_id"),
    ("empty prompt", FLAT, _set(["prompt"], ""), 1, "prompt"),
    ("answers empty list", ZSRE, _set(["answers"], []), 1, "answers"),
    ("answers not a list", ZSRE, _set(["answers"], "uniform"), 1, "answers"),
    ("loc_ans empty", ZSRE, _set(["loc_ans"], ""), 1, "loc_ans"),
    ("zsre subject not in src", ZSRE, _set(["subject"], "Acme"), 1, "subject"),
    ("record not an object", FLAT, lambda r: ["not", "a", "record"], "index 1", "(record)"),
    ("requested_rewrite not an object", ROME, _set(["requested_rewrite"], "x"), 1, "requested_rewrite"),
    ("target_new without str", ROME, _del(["requested_rewrite", "target_new", "str"]), 1,
     "requested_rewrite.target_new.str"),
    ("missing neighborhood_prompts", ROME, _del(["neighborhood_prompts"]), 1, "neighborhood_prompts"),
    ("empty rephrase", FLAT, _set(["rephrase_prompt"], " "), 1, "rephrase_prompt[0]"),
    ("non-string answer", ZSRE, _set(["answers"], [None]), 1, "answers[0]"),
]


@pytest.mark.parametrize("kind,base,mutate,cid,field", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_record_rejected(kind, base, mutate, cid, field, tmp_path):
    recs = _records(base)
    recs[1] = mutate(recs[1])
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(recs))
    with pytest.raises(RequestError) as e:
        load_cases(p)
    assert e.value.case_id == cid, str(e.value)
    assert e.value.field == field, str(e.value)
    assert repr(cid) in str(e.value) and repr(field) in str(e.value)


@pytest.mark.parametrize("content,field", [
    ({"records": [FLAT]}, "(top level)"),  # top level not a list
    ([], "(top level)"),  # no records
    ([{"question": "?", "answer": 1}], "format"),  # unknown format
])
def test_malformed_file_rejected(content, field, tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(content))
    with pytest.raises(RequestError) as e:
        load_cases(p)
    assert e.value.field == field and repr(field) in str(e.value)


def test_explicit_format_mismatch_and_bad_json(tmp_path):
    p = tmp_path / "flat.json"
    p.write_text(json.dumps(_records(FLAT)))
    with pytest.raises(RequestError) as e:
        load_cases(p, "zsre")
    assert e.value.field == "src" and e.value.case_id == 0
    with pytest.raises(RequestError) as e:
        load_cases(p, "csv")
    assert e.value.field == "format"
    q = tmp_path / "broken.json"
    q.write_text("[{")
    with pytest.raises(RequestError, match="not valid JSON"):
        load_cases(q)
    with pytest.raises(DataUnavailableError, match="not found"):
        load_cases(tmp_path / "absent.json")
    assert detect_format(_records(ZSRE)) == "zsre"


def test_hub_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataUnavailableError, match="offline") as e:
        load_hub("azhx/counterfact")
    assert "load_cases" in str(e.value)  # says what to do instead


def test_demo_set_structure():
    raw = json.loads(DEMO_PATH.read_text())
    cases = load_demo()
    assert 40 <= len(cases) <= 60 and len(cases) == len(raw)
    assert len({c.case_id for c in cases}) == len(cases)
    for c, r in zip(cases, raw):
        assert c.request.text == r["prompt"]  # template round-trips to the written prompt
        assert c.request.target_new != c.request.target_true
        assert len(r["target_new"].split()) <= 3 and len(r["ground_truth"].split()) <= 3
        assert r["subject"] in r["prompt"]
        assert c.paraphrase_prompts and c.neighborhood


@needs_data
def test_real_counterfact_flat():
    raw = json.loads((DATA / "counterfact_easyedit" / "counterfact-val.json").read_text())
    cases = load_cases(DATA / "counterfact_easyedit" / "counterfact-val.json")
    assert len(cases) == len(raw)
    for c, r in zip(cases, raw):
        assert c.case_id == r["case_id"] and c.request.subject == r["subject"]
        assert fill_template(c.request.prompt, c.request.subject) == r["prompt"]
        assert c.request.target_new == r["target_new"] and c.request.target_true == r["ground_truth"]
        assert c.paraphrase_prompts == (r["rephrase_prompt"],)
        assert c.neighborhood[0].prompt == r["locality_prompt"]
        assert c.neighborhood[0].answer == r["locality_ground_truth"]


@needs_data
def test_real_rome_and_zsre():
    raw = json.loads((DATA / "counterfact_rome_format_sample13.json").read_text())
    cases = load_cases(DATA / "counterfact_rome_format_sample13.json")
    assert [c.case_id for c in cases] == [r["case_id"] for r in raw]
    for c, r in zip(cases, raw):
        rw = r["requested_rewrite"]
        assert c.request.prompt == rw["prompt"] and c.request.subject == rw["subject"]
        assert c.request.target_new == rw["target_new"]["str"] and c.request.target_true == rw["target_true"]["str"]
        assert c.neighborhood_prompts == tuple(r["neighborhood_prompts"])
        assert c.generation_prompts == tuple(r["generation_prompts"])
        assert c.relation_id == rw["relation_id"]
    rawz = json.loads((DATA / "zsre_mend_train_1k.json").read_text())
    z = load_cases(DATA / "zsre_mend_train_1k.json")
    assert len(z) == len(rawz)
    for c, r in zip(z, rawz):
        assert c.request.text == r["src"] and c.request.target_new == r["answers"][0]
        assert c.paraphrase_prompts == (r["rephrase"],) and c.loc_ans == r["loc_ans"]
    sub = load_cases(DATA / "zsre_mend_train_1k.json", n=10, seed=0)
    assert len(sub) == 10 and len({c.case_id for c in sub}) == 10
