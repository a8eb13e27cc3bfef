"""Stage I (docs/FORMULAS.md §3): torch reference loop as oracle, batching without cross-talk, clamp, stop."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from metake_jax.batch import EditBatch, prepare_batch
from metake_jax.errors import RequestError
from metake_jax.targets import StageIConfig, optimize_targets, row_groups
from tests.tiny import tiny_hf_model, tiny_tokenizer, to_jax

TEMPLATES = [["{}"], ["The cat. {}", "Because I said. {}"]]
REQS = [
    SimpleNamespace(case_id=1, subject="France", prompt="The capital of {} is", target_new="Berlin"),
    SimpleNamespace(case_id=2, subject="Danielle Darrieux", prompt="The mother tongue of {} is",
                    target_new="English"),
    SimpleNamespace(case_id=3, subject="Toko Yasuda", prompt="{} plays the", target_new="piano"),
]
L = 2


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    hf = tiny_hf_model("llama")
    with torch.no_grad():  # larger hidden norms so the weight-decay term does not dominate
        for p in hf.model.embed_tokens.parameters():
            p.mul_(20.0)
    cfg, params = to_jax(hf)
    return tok, hf, cfg, params


def _blocks(hf):
    """The decoder blocks of a transformers model (Llama: model.layers; GPT-2 / GPT-J: transformer.h)."""
    return hf.model.layers if hasattr(hf, "model") else hf.transformer.h


def torch_compute_z(hf, tok, req, hp: StageIConfig, *, templates=TEMPLATES, layer: int = L, at: str = "block",
                    return_info: bool = False):
    """Reference semantics written directly in torch (independent oracle).

    ``at="block"``: MEMIT ``compute_z`` — δ added to block ``layer``'s output, clamp and weight decay
    relative to ‖h_0‖.  ``at="mlp"``: ROME ``compute_v`` — δ added to the output of block ``layer``'s MLP
    module (a forward hook on it), clamp and weight decay relative to ‖m_0‖, that module's output at the
    bare prompt's subject-last token (``target_init``).  Returns z = h_0 + δ (block-output space), and with
    ``return_info`` also {"delta", "m0" (the norm reference), "losses", "clamped" (steps the clamp bound)}."""
    t_ids = tok(" " + req.target_new)["input_ids"]
    flat = [t for g in templates for t in g]
    rows, lookups = [], []
    for tmpl in flat:
        ctx = tmpl.replace("{}", req.prompt)
        prefix = ctx[: ctx.index("{}")]
        lookups.append(len(tok(prefix + req.subject)["input_ids"]) - 1)
        rows.append(tok(ctx.replace("{}", req.subject))["input_ids"] + t_ids[:-1])
    kl = "{} is a"
    lookups.append(len(tok(req.subject)["input_ids"]) - 1)
    rows.append(tok(kl.replace("{}", req.subject))["input_ids"])
    T = max(map(len, rows))
    ids = torch.zeros((len(rows), T), dtype=torch.long)
    att = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        att[i, : len(r)] = 1
    d = hf.config.hidden_size
    delta = torch.zeros(d, dtype=next(hf.parameters()).dtype, requires_grad=True)  # the model's dtype
    state = {}
    bare = flat.index("{}")

    def add_delta(mod, inp, out):
        h = out[0] if isinstance(out, tuple) else out
        if "ref" not in state:  # the initial value, recorded at the first (δ = 0) pass
            state["ref"] = h[bare, lookups[bare]].detach().clone()
        h = h.clone()
        for i, idx in enumerate(lookups):
            h[i, idx] = h[i, idx] + delta
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    def record_block(mod, inp, out):
        if "h0" not in state:
            state["h0"] = (out[0] if isinstance(out, tuple) else out)[bare, lookups[bare]].detach().clone()

    block = _blocks(hf)[layer]
    handles = [block.register_forward_hook(record_block)]  # registered first: sees the MLP-hooked output
    handles.append((block.mlp if at == "mlp" else block).register_forward_hook(add_delta))
    opt = torch.optim.Adam([delta], lr=hp.lr)
    init_logp = None
    losses, clamped = [], 0
    try:
        for it in range(hp.steps):
            opt.zero_grad()
            logits = hf(input_ids=ids, attention_mask=att).logits
            logp = torch.log_softmax(logits, dim=-1)
            nlls = []
            for i in range(len(flat)):
                n = len(rows[i])  # prompt + target[:-1]; logits at n-|t|+j predict target token j
                nlls.append(-sum(logp[i, n - len(t_ids) + j, t] for j, t in enumerate(t_ids)) / len(t_ids))
            nll = torch.stack(nlls).mean()
            kl_logp = logp[-1, lookups[-1]]
            if init_logp is None:
                init_logp = kl_logp.detach().clone()
            kl_term = hp.kl_factor * torch.sum(kl_logp.exp() * (kl_logp - init_logp))
            wd = hp.weight_decay * torch.norm(delta) / torch.norm(state["ref"]) ** 2
            loss = nll + kl_term + wd
            losses.append(loss.item())
            if loss.item() < hp.early_stop or it == hp.steps - 1:
                break
            loss.backward()
            opt.step()
            max_norm = hp.clamp_norm_factor * state["ref"].norm()
            with torch.no_grad():
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
                    clamped += 1
    finally:
        for h in handles:
            h.remove()
    z = (state["h0"] + delta).detach().numpy()
    if not return_info:
        return z
    return z, {"delta": delta.detach().numpy(), "m0": state["ref"].numpy(), "losses": np.asarray(losses),
               "clamped": clamped}


def _run(cfg, params, tok, reqs, hp):
    b, n = prepare_batch(tok, reqs, TEMPLATES)
    b = EditBatch(*map(jnp.asarray, b))
    return optimize_targets(cfg, params, b, L, hp), n


HP = StageIConfig(lr=0.2, steps=6, clamp_norm_factor=0.75)


def test_batched_matches_torch_reference_loop(setup):
    tok, hf, cfg, params = setup
    res, n = _run(cfg, params, tok, REQS, HP)
    Z = np.asarray(res.Z)
    for i, req in enumerate(REQS):
        z_ref = torch_compute_z(hf, tok, req, HP)
        np.testing.assert_allclose(Z[:, i], z_ref, rtol=1e-4, atol=1e-4 * np.abs(z_ref).max())
    # the optimization actually moved the targets
    assert np.abs(np.asarray(res.delta)[:n]).max() > 1e-3


def test_remat_matches_torch_reference_loop(setup):
    """ModelConfig.remat (jax.checkpoint per block, for 6-8B models) changes memory, not the result."""
    tok, hf, cfg, params = setup
    assert cfg.n_layers - L >= 2  # the upper layers run through the rematerialized scan
    res, _ = _run(cfg.replace(remat=True), params, tok, REQS, HP)
    plain, _ = _run(cfg, params, tok, REQS, HP)
    np.testing.assert_allclose(np.asarray(res.Z), np.asarray(plain.Z), rtol=1e-5, atol=1e-5)
    z_ref = torch_compute_z(hf, tok, REQS[0], HP)
    np.testing.assert_allclose(np.asarray(res.Z)[:, 0], z_ref, rtol=1e-4, atol=1e-4 * np.abs(z_ref).max())


def test_row_groups_change_no_number(setup):
    """Length-sorted row groups (each at its own width) = one padded width = every row alone."""
    tok, hf, cfg, params = setup
    b, _ = prepare_batch(tok, REQS, TEMPLATES)
    order, widths = row_groups(b, 4)
    lens = b.mask.sum(axis=1)
    assert sorted(lens[order]) == list(lens[order])  # sorted by length
    assert min(widths) < b.tokens.shape[1]  # grouping really cuts padding on this batch
    with pytest.raises(ValueError, match="row_groups must be >= 1"):
        dataclasses.replace(HP, row_groups=0)
    ref, _ = _run(cfg, params, tok, REQS, dataclasses.replace(HP, row_groups=1))
    for k in (4, b.tokens.shape[0]):  # 4 groups; every row alone
        res, _ = _run(cfg, params, tok, REQS, dataclasses.replace(HP, row_groups=k))
        np.testing.assert_allclose(np.asarray(res.Z), np.asarray(ref.Z), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(res.steps_taken), np.asarray(ref.steps_taken))
        np.testing.assert_allclose(np.asarray(res.losses), np.asarray(ref.losses), rtol=1e-5, atol=1e-6)


def test_no_cross_talk_between_requests(setup):
    tok, _, cfg, params = setup
    res, n = _run(cfg, params, tok, REQS, HP)
    for i, req in enumerate(REQS):
        single, _ = _run(cfg, params, tok, [req], HP)
        np.testing.assert_allclose(np.asarray(single.Z)[:, 0], np.asarray(res.Z)[:, i], atol=1e-4)
        np.testing.assert_array_equal(np.asarray(single.steps_taken)[0], np.asarray(res.steps_taken)[i])


def test_clamp_and_early_stop_per_request(setup):
    tok, _, cfg, params = setup
    hp = StageIConfig(lr=1.0, steps=6, clamp_norm_factor=0.05, weight_decay=0.0, kl_factor=0.0)
    res, n = _run(cfg, params, tok, REQS, hp)
    h0n = np.linalg.norm(np.asarray(res.H0)[:, :n], axis=0)
    dn = np.linalg.norm(np.asarray(res.delta)[:n], axis=1)
    assert (dn <= 0.05 * h0n * (1 + 1e-5)).all()
    assert np.isclose(dn, 0.05 * h0n, rtol=1e-4).any()  # the clamp was active
    # early stop threshold between the requests' initial losses: exactly those below stop at once
    first = np.asarray(res.losses)[0, :n]
    thr = float(np.sort(first)[1]) + 1e-4
    hp2 = StageIConfig(lr=0.2, steps=6, early_stop=thr)
    res2, _ = _run(cfg, params, tok, REQS, hp2)
    taken = np.asarray(res2.steps_taken)[:n]
    losses = np.asarray(res2.losses)[:, :n]
    for i in range(n):
        below = np.nonzero(losses[:, i] < thr)[0]
        expect = min(below[0] if len(below) else hp2.steps - 1, hp2.steps - 1)
        assert taken[i] == expect
    assert taken.min() == 0 and taken.max() > 0


def test_request_errors_name_case_and_field(setup):
    tok = setup[0]
    bad = [
        (SimpleNamespace(case_id=7, subject="", prompt="{} is", target_new="x"), "subject"),
        (SimpleNamespace(case_id=8, subject="Paris", prompt="is in", target_new="x"), "prompt"),
        (SimpleNamespace(case_id=9, subject="Paris", prompt="{} is in", target_new="  "), "target_new"),
    ]
    for req, field in bad:
        with pytest.raises(RequestError) as e:
            prepare_batch(tok, [req], TEMPLATES)
        assert str(req.case_id) in str(e.value) and field in str(e.value)


# ----------------------------------------------------------------------------- prefix reuse (issue 15)

# subject at the start (bare template; "The" is one token, so the prefix is empty), in the middle, at
# the end of the prompt; the context templates put every subject after a prefix too.
POS_REQS = [
    SimpleNamespace(case_id=11, subject="The", prompt="{} Eiffel Tower is located in", target_new="Rome"),
    SimpleNamespace(case_id=12, subject="Danielle Darrieux", prompt="The mother tongue of {} is",
                    target_new="English"),
    SimpleNamespace(case_id=13, subject="Toko Yasuda", prompt="The guitar is played by {}", target_new="piano"),
]


@pytest.fixture(scope="module", params=["gpt2", "gptj", "llama"])
def family_setup(request):
    hf = tiny_hf_model(request.param)
    with torch.no_grad():  # larger hidden norms so the weight-decay term does not dominate
        for p in hf.get_input_embeddings().parameters():
            p.mul_(20.0)
    cfg, params = to_jax(hf)
    return tiny_tokenizer(), cfg, params


def test_prefix_reuse_changes_no_number(family_setup):
    """Steps over the suffix only, attending to cached prefix K/V = steps over whole rows (§3)."""
    tok, cfg, params = family_setup
    b, n = prepare_batch(tok, POS_REQS, TEMPLATES)
    lookup, per = b.lookup, b.tokens.shape[0] // b.valid.shape[0]
    assert lookup[0] == 0  # subject at the very start: nothing cached for that row
    assert 0 < lookup[per] < b.tgt_pos[per, 0]  # in the middle
    assert lookup[2 * per] == b.tgt_pos[2 * per, 0]  # at the end: the target follows at once
    _, widths = row_groups(b, 4, prefix_reuse=True)
    assert max(w.suffix for w in widths) < max(w.full for w in widths)  # the steps really run fewer tokens
    for L_, groups in ((1, 4), (2, 1)):
        hp = dataclasses.replace(HP, steps=8, row_groups=groups)
        b_ = EditBatch(*map(jnp.asarray, b))
        ref = optimize_targets(cfg, params, b_, L_, dataclasses.replace(hp, prefix_reuse=False))
        res = optimize_targets(cfg, params, b_, L_, dataclasses.replace(hp, prefix_reuse=True))
        assert np.abs(np.asarray(ref.delta)[:n]).max() > 1e-2  # the targets moved
        np.testing.assert_allclose(np.asarray(res.Z), np.asarray(ref.Z), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(res.H0), np.asarray(ref.H0), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(res.steps_taken), np.asarray(ref.steps_taken))
        np.testing.assert_allclose(np.asarray(res.losses)[:, :n], np.asarray(ref.losses)[:, :n], rtol=1e-5, atol=1e-6)


def test_compaction_changes_no_number(family_setup):
    """Converged requests leaving the batch (smaller buckets between phases) = masking them (§3)."""
    tok, cfg, params = family_setup
    reqs = POS_REQS + REQS  # 6 requests: bucket 8 -> 4 -> 2 -> 1 as they converge
    b, n = prepare_batch(tok, reqs, TEMPLATES)
    b = EditBatch(*map(jnp.asarray, b))
    hp = dataclasses.replace(HP, lr=0.5, steps=10, weight_decay=0.0, kl_factor=0.0)
    probe = np.asarray(optimize_targets(cfg, params, b, L, dataclasses.replace(hp, compact=False)).losses)[:, :n]

    def stops(thr):  # a request stops at the first step whose loss is below thr (the loop's rule)
        return np.array([min([t for t in range(hp.steps) if probe[t, i] < thr] + [hp.steps - 1]) for i in range(n)])

    # an early-stop threshold that requests meet at different steps, enough of them for the
    # bucket of 8 to shrink, one still running at the end
    vals = np.unique(probe[1:5])
    ok = lambda st: ((st < hp.steps - 1).sum() >= 3 and ((st > 0) & (st < hp.steps - 1)).any()  # noqa: E731
                     and st.max() == hp.steps - 1)
    thr = next(float(t) for t in (vals[1:] + vals[:-1]) / 2 if ok(stops(t)))  # midway: no tie with a loss
    hp = dataclasses.replace(hp, early_stop=thr)
    for reuse in (False, True):
        ref = optimize_targets(cfg, params, b, L, dataclasses.replace(hp, compact=False, prefix_reuse=reuse))
        res = optimize_targets(cfg, params, b, L, dataclasses.replace(hp, compact=True, prefix_reuse=reuse))
        np.testing.assert_array_equal(np.asarray(ref.steps_taken)[:n], stops(thr))
        np.testing.assert_array_equal(np.asarray(res.steps_taken), np.asarray(ref.steps_taken))
        np.testing.assert_allclose(np.asarray(res.Z), np.asarray(ref.Z), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(res.H0), np.asarray(ref.H0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(res.losses)[:, :n], np.asarray(ref.losses)[:, :n], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(res.nll)[:, :n], np.asarray(ref.nll)[:, :n], rtol=1e-5, atol=1e-6)


def test_edit_weights_equal_with_and_without_savings():
    """The written weights (AlphaEdit, two layers) are the same with prefix reuse and compaction on or off."""
    from metake_jax.editor import EditConfig, edit_batch, init_state
    from metake_jax.editors.alphaedit import AlphaEdit

    tok = tiny_tokenizer()
    cfg, params = to_jax(tiny_hf_model("llama"))
    layers = (1, 2)
    eye = jnp.broadcast_to(jnp.eye(cfg.d_ff), (len(layers), cfg.d_ff, cfg.d_ff))
    reqs = POS_REQS + REQS[:2]
    kernels = []
    for on in (False, True):
        hp = dataclasses.replace(HP, lr=0.5, steps=6, early_stop=5.8, prefix_reuse=on, compact=on)
        ecfg = EditConfig(layers=layers, stage1=hp, editor=AlphaEdit(l2=10.0))  # the reference λ
        state, rep = edit_batch(cfg, init_state(params, cfg, layers, P=eye), tok, reqs, TEMPLATES, ecfg)
        kernels.append(np.asarray(state.params["layers"]["mlp"]["fc_out"]["kernel"]))
    k0 = np.asarray(params["layers"]["mlp"]["fc_out"]["kernel"])
    assert np.abs(kernels[0] - k0)[list(layers)].max() > 1e-4  # something was written
    np.testing.assert_allclose(kernels[1], kernels[0], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- ROME's Stage I (issue 14)

# ROME-like template groups of two lengths ("{}" + shorter + longer; the NLL is a uniform mean over all rows)
ROME_TEMPLATES = [["{}"], ["The cat. {}", "Because I said. {}"], ["Therefore, because I said so, you know. {}"]]
ROME_L = 1


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def rome_setup(request):
    """A tiny model whose MLP outputs are of the order of the residual stream (so ‖m_0‖ ≠ ‖h_0‖ matters
    but does not make the weight decay swamp the NLL), the ROME-convention oracle (float64 torch) and an
    early-stop threshold that requests meet at different steps (so compaction really drops some)."""
    hf = tiny_hf_model(request.param)
    with torch.no_grad():
        for p in hf.get_input_embeddings().parameters():
            p.mul_(20.0)
        for blk in _blocks(hf):
            (blk.mlp.down_proj if request.param == "llama" else blk.mlp.c_proj).weight.mul_(10.0)
    cfg, params = to_jax(hf)
    # both sides in float64: on this barely-learnable problem Adam amplifies float32 rounding to ~1e-5 in 8 steps
    cfg = cfg.replace(compute_dtype="float64", param_dtype="float64")
    with jax.enable_x64(True):
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
    hf = hf.double()
    tok = tiny_tokenizer()
    reqs = POS_REQS + REQS  # 6 requests: bucket 8 -> 4 -> 2 -> 1 as they stop
    clamp = 1.5 if request.param == "gpt2" else 0.4  # the clamp binds for some requests on each model
    hp = StageIConfig(lr=0.5, steps=8, clamp_norm_factor=clamp, weight_decay=0.5, kl_factor=0.0625,
                      early_stop=0.0, norm_ref="mlp")
    curves = np.stack([torch_compute_z(hf, tok, r, hp, templates=ROME_TEMPLATES, layer=ROME_L, at="mlp",
                                       return_info=True)[1]["losses"] for r in reqs], 1)  # (steps, n)

    def stops(thr):
        return np.array([min([t for t in range(hp.steps) if curves[t, i] < thr] + [hp.steps - 1])
                         for i in range(len(reqs))])

    vals = np.unique(curves)
    cands = (vals[1:] + vals[:-1]) / 2  # midway: no tie with a loss
    # enough requests stop early for the bucket of 8 to shrink (>= 2 of 6), one runs to the end; a
    # threshold with a stop inside the loop is preferred (these random models barely learn the target)
    ok = lambda st: (st < hp.steps - 1).sum() >= 2 and st.max() == hp.steps - 1  # noqa: E731
    good = [float(t) for t in cands if ok(stops(t))]
    thr = next((t for t in good if ((stops(t) > 0) & (stops(t) < hp.steps - 1)).any()), good[0])
    hp = dataclasses.replace(hp, early_stop=thr)
    want = [torch_compute_z(hf, tok, r, hp, templates=ROME_TEMPLATES, layer=ROME_L, at="mlp", return_info=True)
            for r in reqs]
    return SimpleNamespace(hf=hf, cfg=cfg, params=params, tok=tok, reqs=reqs, hp=hp, stops=stops(thr), want=want)


# XLA:CPU (jaxlib 0.10.2) segfaulted compiling these float64 programs late in the one-process suite (three times,
# CI included; never when this file or test ran alone): they run in an interpreter of their own.
_OWN_PROCESS = os.environ.get("METAKE_OWN_PROCESS") == "rome_norm_ref"


def test_rome_norm_ref_in_own_process():
    """Runs ``test_rome_norm_ref_matches_torch_reference_loop`` (all parameters) in a fresh interpreter."""
    env = dict(os.environ, METAKE_OWN_PROCESS="rome_norm_ref")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                        "test_rome_norm_ref_matches_torch_reference_loop"], env=env, capture_output=True, text=True,
                       timeout=1800, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0 and "4 passed" in r.stdout, (r.stdout + r.stderr)[-4000:]


@pytest.mark.skipif(not _OWN_PROCESS, reason="run in its own interpreter by test_rome_norm_ref_in_own_process")
@pytest.mark.parametrize("reuse,compact", [(False, False), (True, True)])  # each saving alone: the tests above
def test_rome_norm_ref_matches_torch_reference_loop(rome_setup, reuse, compact):
    """norm_ref="mlp" = kmeng01/rome compute_v.py: δ added to the MLP module's output (torch forward hook),
    clamp and weight decay relative to ‖m_0‖ — with prefix reuse and compaction on and off (≤ 1e-5 rel.)."""
    s = rome_setup
    b, n = prepare_batch(s.tok, s.reqs, ROME_TEMPLATES)
    with jax.enable_x64(True):
        b = EditBatch(*[jnp.asarray(x, jnp.float64) if x.dtype == np.float32 else jnp.asarray(x) for x in b])
        res = optimize_targets(s.cfg, s.params, b, ROME_L, dataclasses.replace(s.hp, prefix_reuse=reuse, compact=compact))
        if not reuse and not compact:
            blk = optimize_targets(s.cfg, s.params, b, ROME_L, dataclasses.replace(s.hp, norm_ref="block", compact=False))
    assert np.asarray(res.Z).dtype == np.float64
    np.testing.assert_array_equal(np.asarray(res.steps_taken)[:n], s.stops)
    Z, delta, ref = np.asarray(res.Z), np.asarray(res.delta), np.asarray(res.ref_norm)
    for i, (z_ref, info) in enumerate(s.want):
        assert np.linalg.norm(Z[:, i] - z_ref) <= 1e-5 * np.linalg.norm(z_ref)
        assert np.linalg.norm(delta[i] - info["delta"]) <= 1e-5 * np.linalg.norm(z_ref)
        assert abs(ref[i] - np.linalg.norm(info["m0"])) <= 1e-5 * np.linalg.norm(info["m0"])
    dn = np.linalg.norm(delta[:n], axis=1)
    assert (dn <= s.hp.clamp_norm_factor * ref[:n] * (1 + 1e-5)).all()
    if not reuse and not compact:  # the conventions matter here: the clamp bound, and "block" gives other targets
        assert sum(info["clamped"] for _, info in s.want) > 0
        assert np.abs(np.asarray(blk.Z) - Z)[:, :n].max() > 1e-2
        np.testing.assert_allclose(np.asarray(blk.ref_norm), np.linalg.norm(np.asarray(blk.H0), axis=0), rtol=1e-6)


def test_norm_ref_auto_and_bad_value():
    """"auto" is the editor's convention (ROME: mlp, MEMIT: block) once in an EditConfig; a bad value names the field."""
    from metake_jax.editor import EditConfig
    from metake_jax.editors.memit import MEMIT
    from metake_jax.editors.rome import ROME

    assert EditConfig(layers=(1,), editor=ROME()).stage1.norm_ref == "mlp"
    assert EditConfig(layers=(1,), editor=MEMIT()).stage1.norm_ref == "block"
    assert EditConfig(layers=(1,), editor=ROME(), stage1=StageIConfig(norm_ref="block")).stage1.norm_ref == "block"
    with pytest.raises(ValueError, match=r"^stage1\.norm_ref must be one of auto, block, mlp, got 'h'$"):
        StageIConfig(norm_ref="h")
