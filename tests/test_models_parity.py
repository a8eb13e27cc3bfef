"""Parity of models.interface.forward (loaded through models.convert) against torch transformers.

Oracle: the same random tiny checkpoint run by HF torch in float32 (docs/FORMULAS.md §1 hooks checked
against torch hooks: keys = input of the FFN output projection, block outputs, W_out deltas,
additive residual edits, and restarting from a cached hidden state).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.convert import load_hf_checkpoint
from models.interface import AddAt, WDeltas, forward
from tests import hf_ckpt

torch = pytest.importorskip("torch")

LOGIT_TOL = 1e-4
KEY_TOL = 1e-5  # relative to max(1, max |oracle|): activations here are O(1..10)


@pytest.fixture(scope="module", params=hf_ckpt.FAMILIES)
def loaded(request, tmp_path_factory):
    kind = request.param
    model = hf_ckpt.build(kind)
    d = hf_ckpt.save(model, tmp_path_factory.mktemp(kind))
    cfg, params = load_hf_checkpoint(str(d))
    return kind, model, cfg, params


# One jitted entry (cfg, taps, layers static); every test uses (B, T) = (3, 7) so compiles are shared.
_jit_forward = jax.jit(forward, static_argnums=0, static_argnames=("taps", "start_layer", "stop_layer"))


def _fwd(cfg, params, tokens, mask, **kw):
    return _jit_forward(cfg, params, jnp.asarray(tokens), jnp.asarray(mask), **kw)


def _real_max_diff(ours, theirs, mask) -> float:
    m = np.asarray(mask).astype(bool)
    return float(np.abs(np.asarray(ours)[m] - np.asarray(theirs)[m]).max())


def _real_rel_diff(ours, theirs, mask) -> float:
    """Max abs diff on real tokens, relative to max(1, max |oracle|) (float32 rounding scales)."""
    m = np.asarray(mask).astype(bool)
    ref = np.asarray(theirs)[m]
    return float(np.abs(np.asarray(ours)[m] - ref).max() / max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
def test_logits_match_torch(loaded, left):
    kind, model, cfg, params = loaded
    tokens, mask = hf_ckpt.batch(lengths=(7, 4, 2), left=left)
    ours = _fwd(cfg, params, tokens, mask).logits
    ref = hf_ckpt.torch_logits(model, tokens, mask).logits.numpy()
    assert np.abs(ref[mask.astype(bool)]).max() > 0.5, "oracle logits too small for a meaningful check"
    assert _real_max_diff(ours, ref, mask) <= LOGIT_TOL


def test_keys_and_block_outputs_match_torch_hooks(loaded):
    kind, model, cfg, params = loaded
    tokens, mask = hf_ckpt.batch(lengths=(7, 3, 5), left=True)
    taps = tuple(range(cfg.n_layers))
    captured_keys, captured_blocks = {}, {}
    handles = []
    for l in taps:
        handles.append(hf_ckpt.fc_out_module(model, l).register_forward_pre_hook(
            lambda mod, args, l=l: captured_keys.__setitem__(l, args[0].detach().numpy())))
        handles.append(hf_ckpt.decoder_layers(model)[l].register_forward_hook(
            lambda mod, args, out, l=l: captured_blocks.__setitem__(
                l, (out[0] if isinstance(out, tuple) else out).detach().numpy())))
    try:
        ref = hf_ckpt.torch_logits(model, tokens, mask, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    out = _fwd(cfg, params, tokens, mask, taps=taps)
    m = mask.astype(bool)
    for j, l in enumerate(taps):
        assert _real_rel_diff(out.keys[j], captured_keys[l], mask) <= KEY_TOL, f"keys of layer {l}"
        assert _real_rel_diff(out.hidden[j], captured_blocks[l], mask) <= KEY_TOL, f"block {l}"
        if l + 1 < cfg.n_layers:  # HF's last hidden state is after the final norm
            hs = ref.hidden_states[l + 1].numpy()
            assert _real_rel_diff(out.hidden[j], hs, mask) <= KEY_TOL


def test_w_out_deltas_match_edited_torch_weights(loaded):
    kind, model, cfg, params = loaded
    tokens, mask = hf_ckpt.batch(lengths=(7, 5, 2), left=False)
    layers = (0, cfg.n_layers - 1)
    rng = np.random.default_rng(3)
    delta = rng.normal(0, 0.3, (len(layers), cfg.d_ff, cfg.d_model)).astype(np.float32)
    ours = jax.jit(lambda p, t, mk, dl: forward(cfg, p, t, mk, w_out_deltas=WDeltas(layers, dl)).logits)(
        params, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(delta))
    base = hf_ckpt.torch_logits(model, tokens, mask).logits.numpy()
    saved = {}
    with torch.no_grad():
        for j, l in enumerate(layers):
            w = hf_ckpt.fc_out_module(model, l).weight
            saved[l] = w.clone()
            conv1d = kind == "gpt2"  # Conv1D weight is (in, out) = our layout; Linear is (out, in)
            w.add_(torch.as_tensor(delta[j] if conv1d else delta[j].T))
    try:
        ref = hf_ckpt.torch_logits(model, tokens, mask).logits.numpy()
    finally:
        with torch.no_grad():
            for l, w0 in saved.items():
                hf_ckpt.fc_out_module(model, l).weight.copy_(w0)
    assert _real_max_diff(ref, base, mask) > 1e-2, "delta had no effect in torch"
    assert _real_max_diff(ours, ref, mask) <= LOGIT_TOL


def test_add_at_matches_torch_block_hook(loaded):
    kind, model, cfg, params = loaded
    tokens, mask = hf_ckpt.batch(lengths=(7, 4, 6), left=True)
    layer = 1
    positions = np.array([6, 4, 3])
    delta = np.random.default_rng(5).normal(0, 1.0, (3, cfg.d_model)).astype(np.float32)

    def hook(mod, args, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        for b, p in enumerate(positions):
            h[b, p] += torch.as_tensor(delta[b])
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    handle = hf_ckpt.decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        ref = hf_ckpt.torch_logits(model, tokens, mask).logits.numpy()
    finally:
        handle.remove()
    ours = jax.jit(lambda p, t, mk, pos, dl: forward(cfg, p, t, mk, add_at=AddAt(layer, pos, dl)).logits)(
        params, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(positions), jnp.asarray(delta))
    assert _real_max_diff(ours, ref, mask) <= LOGIT_TOL


def test_start_layer_from_cached_hidden_equals_full_forward(loaded):
    kind, model, cfg, params = loaded
    tokens, mask = hf_ckpt.batch(lengths=(7, 3, 5), left=True)
    full = _fwd(cfg, params, tokens, mask).logits
    s = 2
    h = _fwd(cfg, params, tokens, mask, stop_layer=s).last_hidden
    ref_h = hf_ckpt.torch_logits(model, tokens, mask, output_hidden_states=True).hidden_states[s].numpy()
    assert _real_rel_diff(h, ref_h, mask) <= KEY_TOL
    resumed = _jit_forward(cfg, params, None, jnp.asarray(mask), start_layer=s, h_start=h).logits
    assert _real_max_diff(resumed, full, mask) <= 1e-5


@pytest.mark.parametrize("kind", ["gpt2", "llama_untied"])
def test_bfloat16_smoke(kind, tmp_path):
    """bf16 params + compute: finite logits whose top-1 mostly agrees with torch float32."""
    model = hf_ckpt.build(kind)
    cfg16, p16 = load_hf_checkpoint(str(hf_ckpt.save(model, tmp_path / "m")), dtype="bfloat16")
    assert cfg16.compute_dtype == "bfloat16"
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))
    tokens, mask = hf_ckpt.batch(lengths=(7, 7, 7), left=False, rng_seed=1)
    ours = np.asarray(_fwd(cfg16, p16, tokens, mask).logits, np.float32)
    ref = hf_ckpt.torch_logits(model, tokens, mask).logits.numpy()
    assert np.isfinite(ours).all()
    agree = (ours.argmax(-1) == ref.argmax(-1)).mean()
    assert agree >= 0.6, f"bf16 top-1 agreement {agree:.2f}"
