"""PMET (metake_jax/editors/pmet.py; docs/FORMULAS.md §4 "PMET", BASELINES.md §4).

Oracles: HF torch forward hooks on the attention / FFN output projections of tiny random checkpoints
(the δ_attn / δ_mlp sites and the FFN-output tap); MEMIT's Stage I terms (δ_attn = 0 and δ_mlp = x give
MEMIT's loss with δ = x on the block output, since the block output is linear in the FFN output); a float64
numpy transcription of the update and of the multi-layer write with its FFN-output residual.
"""
from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metake_jax import editors
from metake_jax.batch import EditBatch, prepare_batch
from metake_jax.editor import EditConfig, edit_batch, init_state
from metake_jax.editors import LayerStats, NotGatedError
from metake_jax.editors.pmet import PMET
from metake_jax.keys import keys_and_hidden
from metake_jax.metake import MetaKEConfig
from metake_jax.methods import methods
from metake_jax.targets import (
    StageIConfig, attn_ffn_terms, lower_hidden, optimize_attn_ffn_targets, row_terms, safe_norm, upper_logits,
)
from metake_jax.write import editor_keys, multilayer_write
from models.convert import load_hf_checkpoint
from models.interface import block_parts_at, forward, make_context, w_out
from tests import hf_ckpt
from tests.tiny import tiny_model, tiny_tokenizer

TEMPLATES = [["{}"], ["The cat. {}"]]
REQS = [
    SimpleNamespace(case_id=1, subject="France", prompt="The capital of {} is", target_new="Berlin"),
    SimpleNamespace(case_id=2, subject="Toko Yasuda", prompt="{} plays the", target_new="piano"),
]
LAYERS = (1, 2)  # not the last block: a δ there reaches no target logit (no attention after it)
LAM = 3.0


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def np_pmet(K, R, C0, lam, Cp=None):
    """Δᵀ = (R Kᵀ (K Kᵀ + λ C0 [+ C_p])⁻¹)ᵀ in float64 (R already divided by √(m − t))."""
    K, R, C0 = (np.asarray(x, np.float64) for x in (K, R, C0))
    A = K @ K.T + lam * C0 + (0 if Cp is None else np.asarray(Cp, np.float64))
    return (R @ K.T @ np.linalg.inv(A)).T


def _stats(d_k: int, m: int, seed: int) -> LayerStats:
    rng = np.random.default_rng(seed)
    C0, Cp = [], []
    for _ in range(m):
        A = rng.normal(size=(d_k, 3 * d_k))
        C0.append(A @ A.T / (3 * d_k))
        B = rng.normal(size=(d_k, 4)) * 0.3
        Cp.append(B @ B.T)
    return LayerStats(P=None, C0=jnp.asarray(np.stack(C0), jnp.float32), Cp=jnp.asarray(np.stack(Cp), jnp.float32))


# ----------------------------------------------------------------------------- model hooks vs torch


torch = pytest.importorskip("torch")


@pytest.mark.parametrize("kind", ["gpt2", "gptj", "llama_untied", "phi"])
def test_attention_and_ffn_shifts_match_torch_hooks(kind, tmp_path):
    model = hf_ckpt.build(kind)
    cfg, params = load_hf_checkpoint(str(hf_ckpt.save(model, tmp_path)))
    tokens, mask = hf_ckpt.batch(lengths=(7, 4, 6), left=False)
    layer, pos = 1, np.array([5, 2, 3])
    rng = np.random.default_rng(7)
    da = rng.normal(0, 1.0, (3, cfg.d_model)).astype(np.float32)
    dm = rng.normal(0, 1.0, (3, cfg.d_model)).astype(np.float32)
    seen = {}

    def shift(name, d):
        def hook(mod, args, out):
            out = out.clone()
            for b, p in enumerate(pos):
                out[b, p] += torch.as_tensor(d[b])
            seen[name] = out.detach().numpy()
            return out
        return hook

    hs = [hf_ckpt.attn_out_module(model, layer).register_forward_hook(shift("a", da)),
          hf_ckpt.fc_out_module(model, layer).register_forward_hook(shift("m", dm))]
    try:
        ref = hf_ckpt.torch_logits(model, tokens, mask).logits.numpy()
    finally:
        for h in hs:
            h.remove()
    base = hf_ckpt.torch_logits(model, tokens, mask).logits.numpy()
    toks, mk = jnp.asarray(tokens), jnp.asarray(mask)
    h_in = forward(cfg, params, toks, mk, stop_layer=layer).last_hidden
    oh = jax.nn.one_hot(jnp.asarray(pos), tokens.shape[1])[:, :, None]
    out, _, a, m = block_parts_at(cfg, params, layer, h_in, make_context(mk), attn_add=oh * da[:, None],
                                  mlp_add=oh * dm[:, None])
    logits = forward(cfg, params, None, mk, h_start=out, start_layer=layer + 1).logits
    real = mask.astype(bool)
    assert np.abs(ref - base)[real].max() > 1e-2  # the shifts matter
    assert np.abs(np.asarray(a) - seen["a"])[real].max() <= 1e-5 * max(1.0, np.abs(seen["a"]).max())
    assert np.abs(np.asarray(m) - seen["m"])[real].max() <= 1e-5 * max(1.0, np.abs(seen["m"]).max())
    assert np.abs(np.asarray(logits) - ref)[real].max() <= 1e-4
    # no shift: exactly the plain block
    out0, k0, _, _ = block_parts_at(cfg, params, layer, h_in, make_context(mk))
    plain = forward(cfg, params, toks, mk, taps=(layer,), stop_layer=layer + 1)
    np.testing.assert_array_equal(np.asarray(out0), np.asarray(plain.last_hidden))


# ----------------------------------------------------------------------------- Stage I


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    cfg, params = tiny_model("llama", seed=1)
    hb, _ = prepare_batch(tok, REQS, TEMPLATES)
    return tok, cfg, params, EditBatch(*map(jnp.asarray, hb))


def test_zero_attention_shift_gives_memit_stage1_terms(setup):
    """δ_attn = 0, δ_mlp = x: the NLL and KL equal MEMIT's with δ = x on block L's output."""
    _, cfg, params, b = setup
    L = 2
    x = jnp.asarray(np.random.default_rng(0).normal(0, 0.5, (b.valid.shape[0], cfg.d_model)), jnp.float32)
    h_in = lower_hidden(cfg, params, b, L)
    _, lk0 = upper_logits(cfg, params, b, h_in, L)
    lp0 = jax.nn.log_softmax(lk0, axis=-1)
    nll, kl, _ = attn_ffn_terms(cfg, params, b, L, h_in, jnp.zeros_like(x), x, lp0)
    lt, lk = upper_logits(cfg, params, b, h_in, L, delta_rows=x[jnp.repeat(jnp.arange(2), b.tokens.shape[0] // 2)])
    rn, kr = row_terms(lt, lk, b, lp0)
    np.testing.assert_allclose(np.asarray(nll), np.asarray(b.nll_avg @ rn), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(kl), np.asarray(b.kl_sel @ kr), rtol=1e-4, atol=1e-7)
    assert float(jnp.min(kl)) > 0


def test_stage1_targets_clamps_and_ffn_space(setup):
    _, cfg, params, b = setup
    hp = StageIConfig(steps=6, lr=0.5, clamp_norm_factor=0.3)
    r = optimize_attn_ffn_targets(cfg, params, b, 2, hp)
    # H0 is the FFN output at the bare prompt = fc_out(k*) — what the write's residual reads at t = 0
    _, M, _ = editor_keys(cfg, params, b, (2,), PMET())
    np.testing.assert_allclose(np.asarray(r.H0), np.asarray(M), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(r.Z - r.H0), np.asarray(r.delta.T), rtol=1e-5, atol=1e-6)
    a0 = np.asarray(r.Z_attn - r.delta_attn.T)
    for d, ref in ((np.asarray(r.delta), np.asarray(r.H0).T), (np.asarray(r.delta_attn), a0.T)):
        nd, nr = np.linalg.norm(d, axis=1), np.linalg.norm(ref, axis=1)
        assert np.all(nd > 0) and np.all(nd <= 0.3 * nr * (1 + 1e-5))
    assert np.all(np.asarray(r.steps_taken) >= 1) and np.all(np.isfinite(np.asarray(r.losses)))


# ----------------------------------------------------------------------------- the update


@pytest.mark.parametrize("use_cache", [False, True])
def test_increment_matches_numpy(use_cache):
    d_k, d, n = 16, 6, 3
    rng = np.random.default_rng(0)
    st = _stats(d_k, 2, seed=1)
    K = jnp.asarray(rng.normal(size=(d_k, n)), jnp.float32)
    R = jnp.asarray(rng.normal(size=(d, n)), jnp.float32)
    inc, _ = PMET(mom2_update_weight=LAM, use_cache=use_cache).increment(K, R, 1, st)
    want = np_pmet(K, R, st.C0[1], LAM, st.Cp[1] if use_cache else None)
    assert inc.shape == (d_k, d) and _rel(inc, want) <= 1e-6
    ed = PMET()
    assert [float(ed.residual_divisor(4, t)) for t in range(4)] == pytest.approx([2.0, 3 ** 0.5, 2 ** 0.5, 1.0])


def test_multilayer_write_matches_numpy_ffn_residual(setup):
    """The write re-composed in numpy: per step t, keys on the model with the earlier increments,
    M_L = k*_L (W_L + Δ_L) + b_L (FFN output at the bare prompt), R = (Z − M_L)/√(m − t), float64 solve."""
    _, cfg, params, b = setup
    st = _stats(cfg.d_ff, 2, seed=2)
    Z = jnp.asarray(np.random.default_rng(1).normal(0, 0.5, (cfg.d_model, 2)), jnp.float32)
    ed = PMET(mom2_update_weight=LAM)
    with ed.scope():
        got, aux = jax.jit(multilayer_write, static_argnames=("cfg", "layers", "editor"))(
            cfg, params, b, Z, LAYERS, st, ed)
    m, L = len(LAYERS), LAYERS[-1]
    W = np.asarray(w_out(params, LAYERS), np.float64)
    bias = np.asarray(params["layers"]["mlp"]["fc_out"].get("bias", np.zeros((cfg.n_layers, cfg.d_model)))[L],
                      np.float64)
    deltas = np.zeros((m, cfg.d_ff, cfg.d_model))
    for t in range(m):
        K, _, Kb = keys_and_hidden(cfg, params, b, LAYERS, jnp.asarray(deltas, jnp.float32), bare=True)
        M = np.asarray(Kb[-1], np.float64).T @ (W[-1] + deltas[-1]) + bias
        R = (np.asarray(Z, np.float64) - M.T) / np.sqrt(m - t)
        deltas[t] = np_pmet(K[t], R, st.C0[t], LAM)
    for t in range(m):
        assert _rel(got[t], deltas[t]) <= 1e-5, t


def test_edit_batch_with_pmet(setup):
    tok, cfg, params, b = setup
    st = _stats(cfg.d_ff, 2, seed=3)
    ed = PMET(mom2_update_weight=LAM)
    state = init_state(params, cfg, LAYERS, C0=st.C0)
    hp = StageIConfig(steps=4, lr=0.5)
    new, rep = edit_batch(cfg, state, tok, REQS, TEMPLATES, EditConfig(layers=LAYERS, stage1=hp, editor=ed))
    k0, k1 = np.asarray(w_out(params, LAYERS)), np.asarray(w_out(new.params, LAYERS))
    assert np.all(np.isfinite(k1)) and np.abs(k1 - k0).max() > 0
    # step 0 of the write: R = (z − m0)/√m = δ_mlp/√m
    r = optimize_attn_ffn_targets(cfg, params, b, LAYERS[-1], hp)
    np.testing.assert_allclose(rep.residual_norm[0], np.linalg.norm(np.asarray(r.delta), axis=1) / np.sqrt(2),
                               rtol=1e-4)
    assert not ed.gated and "pmet" in methods() and "metake_pmet" not in methods()
    with pytest.raises(NotGatedError, match="pmet"):
        EditConfig(layers=LAYERS, editor=ed, metake=MetaKEConfig())
    assert editors.build("pmet", {"mom2_update_weight": 6000}) == PMET(mom2_update_weight=6000.0)


def test_stage1_loop_matches_a_literal_per_request_transcription(setup):
    """The jitted batched loop against the reference control flow written out per request in Python
    (BLUE ``pmet/compute_zs.py``): loss with the current NLL factor, stop at loss < 5e-2, factor 0.1× after
    an all-argmax step (stop if KL < 0.01 too), last step without update, Adam on (δ_attn, δ_mlp), clamps."""
    import optax

    tok, cfg, params, _ = setup
    # one-token targets (the tiny random model never makes a target the argmax everywhere, so the 0.1×
    # factor branch is transcribed but not reached here)
    reqs = [SimpleNamespace(case_id=1, subject="France", prompt="The capital of {} is", target_new="is"),
            SimpleNamespace(case_id=2, subject="Toko Yasuda", prompt="{} plays the", target_new="the")]
    hb, _ = prepare_batch(tok, reqs, TEMPLATES)
    b = EditBatch(*map(jnp.asarray, hb))
    L, hp, nlf = 2, StageIConfig(steps=15, lr=2.0, clamp_norm_factor=100.0, kl_factor=0.0625), 1.0
    got = optimize_attn_ffn_targets(cfg, params, b, L, hp, nlf)
    h_in = lower_hidden(cfg, params, b, L)
    _, lk0 = upper_logits(cfg, params, b, h_in, L)
    lp0 = jax.nn.log_softmax(lk0, axis=-1)
    from models.interface import gather_positions

    _, _, a_rows, m_rows = block_parts_at(cfg, params, L, h_in, make_context(b.mask))
    a0 = np.asarray(gather_positions(a_rows, b.lookup[:, None])[:, 0])[np.asarray(b.bare_row)]
    m0 = np.asarray(gather_positions(m_rows, b.lookup[:, None])[:, 0])[np.asarray(b.bare_row)]

    def loss_i(da, dm, i, f):
        nll, kl, ok = attn_ffn_terms(cfg, params, b, L, h_in, da, dm, lp0)
        # ‖δ‖ with torch.norm's zero subgradient at δ = 0 (the reference's first step)
        wd = hp.weight_decay * (safe_norm(dm[i]) / np.linalg.norm(m0[i]) ** 2
                                + safe_norm(da[i]) / np.linalg.norm(a0[i]) ** 2)
        total = f * nll[i] + hp.kl_factor * kl[i] + wd
        return total, (kl[i], ok[i])

    vg = jax.jit(jax.value_and_grad(loss_i, argnums=(0, 1), has_aux=True), static_argnums=2)
    for i in range(2):
        da = jnp.zeros((2, cfg.d_model))
        dm = jnp.zeros((2, cfg.d_model))
        opt = optax.adam(hp.lr)
        state = opt.init((da[i], dm[i]))
        f = nlf
        for it in range(hp.steps):
            (total, (kl, ok)), (ga, gm) = vg(da, dm, i, f)
            if float(total) < 5e-2:
                break
            if bool(ok):
                f = 0.1 * nlf
                if float(kl) < 0.01:
                    break
            else:
                f = nlf
            if it == hp.steps - 1:
                break
            upd, state = opt.update((ga[i], gm[i]), state, (da[i], dm[i]))
            na, nm = da[i] + upd[0], dm[i] + upd[1]
            for name, x, ref in (("a", na, a0[i]), ("m", nm, m0[i])):
                mx = hp.clamp_norm_factor * np.linalg.norm(ref)
                x = x * mx / jnp.linalg.norm(x) if float(jnp.linalg.norm(x)) > mx else x
                if name == "a":
                    na = x
                else:
                    nm = x
            da, dm = da.at[i].set(na), dm.at[i].set(nm)
        # float32 round-off of the batched vs single-request passes, through up to 14 Adam steps
        assert _rel(got.delta_attn[i], da[i]) <= 1e-3, i
        assert _rel(got.delta[i], dm[i]) <= 1e-3, i
