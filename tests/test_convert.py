"""models.convert: checkpoint formats, HF export round trip, orbax round trip, clear errors.

Oracle: torch transformers logits of the same tiny random checkpoint (float32).
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import convert, load
from models.convert import ConversionError
from models.interface import forward, w_out, with_w_out
from tests import hf_ckpt

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

TOL = 1e-4
_jit_forward = jax.jit(forward, static_argnums=0)


def _ours(cfg, params, tokens, mask):
    return np.asarray(_jit_forward(cfg, params, jnp.asarray(tokens), jnp.asarray(mask)).logits)


def _check_against(model, cfg, params):
    tokens, mask = hf_ckpt.batch(lengths=(7, 4, 2), left=False)
    ref = hf_ckpt.torch_logits(model, tokens, mask).logits.numpy()
    m = mask.astype(bool)
    diff = np.abs(_ours(cfg, params, tokens, mask)[m] - ref[m]).max()
    assert diff <= TOL, diff


@pytest.fixture(scope="module")
def gpt2():
    return hf_ckpt.build("gpt2")


@pytest.fixture(scope="module")
def llama():
    return hf_ckpt.build("llama_untied")


def _save_bin(model, d, n_shards: int = 1):
    """pytorch_model.bin (or n shards + pytorch_model.bin.index.json) as older transformers wrote them."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    (d / "config.json").write_text(json.dumps(model.config.to_dict()))
    if n_shards == 1:
        torch.save(sd, d / "pytorch_model.bin")
        return d
    names = sorted(sd)
    weight_map = {}
    for i in range(n_shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = {n: sd[n] for n in names[i::n_shards]}
        torch.save(part, d / fname)
        weight_map.update({n: fname for n in part})
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def test_pytorch_bin(llama, tmp_path):
    d = _save_bin(llama, tmp_path)
    assert not (d / "model.safetensors").exists()
    _check_against(llama, *convert.load_hf_checkpoint(str(d)))


def test_sharded_safetensors_index(llama, tmp_path):
    d = hf_ckpt.save(llama, tmp_path, max_shard_size="20KB")
    shards = set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) > 1 and not (d / "model.safetensors").exists()
    _check_against(llama, *convert.load_hf_checkpoint(str(d)))


def test_sharded_bin_index(gpt2, tmp_path):
    _check_against(gpt2, *convert.load_hf_checkpoint(str(_save_bin(gpt2, tmp_path, n_shards=3))))


def test_legacy_gpt2_names_without_prefix(gpt2, tmp_path):
    from safetensors.torch import save_file

    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in gpt2.state_dict().items()
          if k != "lm_head.weight"}
    assert not any(k.startswith("transformer.") for k in sd)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(gpt2.config.to_dict()))
    cfg, params = convert.load_hf_checkpoint(str(tmp_path))
    _check_against(gpt2, cfg, params)


@pytest.mark.parametrize("kind", hf_ckpt.FAMILIES)
def test_export_round_trip(kind, tmp_path):
    model = hf_ckpt.build(kind, seed=7)
    cfg, params = convert.load_hf_checkpoint(str(hf_ckpt.save(model, tmp_path / "src")))
    # edit the weights so the export is not a copy of the source files
    every = tuple(range(cfg.n_layers))
    params = with_w_out(params, every, w_out(params, every) * 1.5)
    out = convert.export_hf(tmp_path / "out", cfg, params)
    exported = json.loads((out / "config.json").read_text())
    assert exported["model_type"] == {"llama_tied": "llama", "llama_untied": "llama"}.get(kind, kind)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), dtype=torch.float32, attn_implementation="eager").eval()
    assert type(reloaded) is type(model)
    _check_against(reloaded, cfg, params)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_orbax_round_trip(llama, tmp_path, dtype):
    cfg, params = convert.load_hf_checkpoint(str(hf_ckpt.save(llama, tmp_path / "src")), dtype=dtype)
    convert.save_converted(tmp_path / "conv", cfg, params)
    cfg2, params2 = convert.restore_converted(tmp_path / "conv")
    assert cfg2 == cfg
    assert jax.tree.structure(params2) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        assert a.dtype == b.dtype == jnp.dtype(dtype)
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    cfg3, params3, tok = load.load_model(str(tmp_path / "conv"))
    assert cfg3 == cfg and tok is None


# ----------------------------------------------------------------------------- errors


def _state(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _write(tmp_path, model, sd, config=None):
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config or model.config.to_dict()))
    return str(tmp_path)


def test_error_unknown_architecture(llama, tmp_path):
    conf = llama.config.to_dict() | {"model_type": "bert", "architectures": ["BertModel"]}
    with pytest.raises(ConversionError, match=r"unknown architecture.*'bert'"):
        convert.load_hf_checkpoint(_write(tmp_path, llama, _state(llama), conf))


def test_error_missing_files(llama, tmp_path):
    with pytest.raises(ConversionError, match="config.json"):
        convert.load_hf_checkpoint(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(llama.config.to_dict()))
    with pytest.raises(ConversionError, match="model.safetensors"):
        convert.load_hf_checkpoint(str(tmp_path))


def test_error_missing_shard(llama, tmp_path):
    d = hf_ckpt.save(llama, tmp_path, max_shard_size="20KB")
    shard = sorted(set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values()))[0]
    (d / shard).unlink()
    with pytest.raises(ConversionError, match=shard):
        convert.load_hf_checkpoint(str(d))


def test_error_missing_tensor(llama, tmp_path):
    sd = _state(llama)
    del sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ConversionError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        convert.load_hf_checkpoint(_write(tmp_path, llama, sd))


def test_error_extra_tensor(llama, tmp_path):
    sd = _state(llama) | {"model.layers.0.mystery.weight": torch.zeros(3)}
    with pytest.raises(ConversionError, match=r"unexpected tensor.*model\.layers\.0\.mystery\.weight"):
        convert.load_hf_checkpoint(_write(tmp_path, llama, sd))


def test_error_shape_mismatch(llama, tmp_path):
    sd = _state(llama)
    sd["model.layers.2.self_attn.k_proj.weight"] = torch.zeros(5, 32)
    with pytest.raises(ConversionError, match=r"model\.layers\.2\.self_attn\.k_proj\.weight.*shape"):
        convert.load_hf_checkpoint(_write(tmp_path, llama, sd))


def test_error_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConversionError, match=r"'someorg/some-model'.*HF_HUB_OFFLINE.*local directory"):
        convert.load_hf_checkpoint("someorg/some-model")
    with pytest.raises(ConversionError, match=r"someorg/some-model.*HF_HUB_OFFLINE"):
        load.load_model("someorg/some-model")


def test_error_unknown_model_spec():
    with pytest.raises(ConversionError, match=r"unknown model 'gpt5'.*smollm2.*gguf.*hub id"):
        load.load_model("gpt5")


def test_error_bad_dtype(llama, tmp_path):
    with pytest.raises(ConversionError, match="float16"):
        convert.load_hf_checkpoint(str(hf_ckpt.save(llama, tmp_path)), dtype="float16")


def test_export_refuses_nan(llama, tmp_path):
    cfg, params = convert.load_hf_checkpoint(str(hf_ckpt.save(llama, tmp_path / "src")))
    params = with_w_out(params, (1,), w_out(params, (1,)).at[0, 0, 0].set(jnp.nan))
    with pytest.raises(ConversionError, match=r"layers/mlp/fc_out/kernel.*NaN"):
        convert.export_hf(tmp_path / "out", cfg, params)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    with pytest.raises(ConversionError, match="NaN"):
        convert.save_converted(tmp_path / "conv", cfg, params)


# ----------------------------------------------------------------------------- GGUF (tiny, F32)

_HF_TO_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _write_gguf(model, path, arch: str, extra=None):
    """Write ``model`` as an F32 GGUF the way llama.cpp's converter does (q/k rows permuted for llama)."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    if extra is not None:
        extra(w)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    for name, a in sd.items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{_HF_TO_GGUF_LAYER[rest]}"
            if arch == "llama" and rest.startswith(("self_attn.q_proj", "self_attn.k_proj")):
                heads = c.num_attention_heads if "q_proj" in rest else c.num_key_value_heads
                a = convert.llamacpp_permute(a, heads)
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        w.add_tensor(gname, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("kind", ["llama_tied", "llama_untied", "qwen2", "qwen3"])
def test_gguf_tiny_matches_torch(kind, tmp_path):
    model = hf_ckpt.build(kind, seed=11)
    arch = {"llama_tied": "llama", "llama_untied": "llama"}.get(kind, kind)
    cfg, params = convert.load_gguf(_write_gguf(model, tmp_path / "m.gguf", arch))
    assert cfg.tie_embeddings == model.config.tie_word_embeddings
    assert (cfg.attn_bias, cfg.qk_norm) == (kind == "qwen2", kind == "qwen3")
    _check_against(model, cfg, params)


def test_llamacpp_permutation_round_trip():
    w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)
    p = convert.llamacpp_permute(w, 6)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(convert.llamacpp_unpermute(p, 6), w)
    # head 0 rows in GGUF order interleave the two rotary halves: x0, y0, x1, y1, ...
    np.testing.assert_array_equal(p[:4, 0], w[[0, 4, 1, 5], 0])


def test_gguf_errors(tmp_path):
    with pytest.raises(ConversionError, match="GGUF file not found.*nope.gguf"):
        convert.load_gguf(tmp_path / "nope.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ConversionError, match="bad.gguf"):
        convert.load_gguf(tmp_path / "bad.gguf")
    model = hf_ckpt.build("llama_untied")
    scaled = _write_gguf(model, tmp_path / "scaled.gguf", "llama", extra=lambda w: w.add_rope_scaling_type(
        __import__("gguf").RopeScalingType.LINEAR))
    with pytest.raises(ConversionError, match=r"scaled.gguf.*rope scaling.*linear"):
        convert.load_gguf(scaled)
