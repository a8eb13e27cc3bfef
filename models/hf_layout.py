"""HF transformers config/tensor names <-> our param tree (models/config.py layout).

Pure numpy: ``hf_to_params`` takes a flat ``{name: array}`` HF state dict (torch layout) and
returns the stacked Flax tree; ``params_to_hf`` is its inverse (used by the HF export).
Unknown architectures, missing / extra tensors and shape mismatches raise ``ConversionError``
naming the tensor.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from models.config import ModelConfig

ARCH_TO_FAMILY = {
    "gpt2": "gpt2",
    "gptj": "gptj",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "smollm2": "llama",
}

# HF tensors that are buffers, not weights; ignored when present.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq", ".attn.embed_positions")


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message names the file / tensor / architecture."""


def config_from_hf(hf: Mapping[str, Any], *, name: str = "model") -> ModelConfig:
    """Build a ModelConfig from an HF ``config.json`` dict."""
    mt = str(hf.get("model_type", "")).lower()
    if mt not in ARCH_TO_FAMILY:
        raise ConversionError(
            f"unknown architecture model_type={mt!r} (architectures={hf.get('architectures')}); "
            f"supported: {', '.join(sorted(ARCH_TO_FAMILY))}"
        )
    fam = ARCH_TO_FAMILY[mt]
    if fam == "gpt2":
        d = hf["n_embd"]
        return ModelConfig(
            family="gpt2", vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"],
            n_heads=hf["n_head"], d_ff=hf.get("n_inner") or 4 * d,
            max_positions=hf.get("n_positions", 1024), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=True, activation="gelu_new", name=name,
            bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
        )
    if fam == "gptj":
        d = hf["n_embd"]
        return ModelConfig(
            family="gptj", vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"],
            n_heads=hf["n_head"], d_ff=hf.get("n_inner") or 4 * d,
            max_positions=hf.get("n_positions", 2048), norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            rotary_dim=hf.get("rotary_dim"), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            lm_head_bias=True, activation="gelu_new", name=name,
            bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
        )
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if rtype not in (None, "default"):
        raise ConversionError(f"rope_type={rtype!r} is not supported (model_type={mt!r})")
    eos = hf.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0]
    return ModelConfig(
        family="llama", vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim"),
        d_ff=hf["intermediate_size"], max_positions=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attn_bias=bool(hf.get("attention_bias", mt == "qwen2")), qk_norm=(mt == "qwen3"),
        activation="silu", name=name, bos_token_id=hf.get("bos_token_id"), eos_token_id=eos,
    )


def _layer_map(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...], bool]]:
    """(hf name suffix within a layer, our path, transpose?) for per-layer tensors."""
    if cfg.family == "gpt2":
        # c_attn is fused; handled separately.
        return [
            ("ln_1.weight", ("ln_1", "scale"), False), ("ln_1.bias", ("ln_1", "bias"), False),
            ("ln_2.weight", ("ln_2", "scale"), False), ("ln_2.bias", ("ln_2", "bias"), False),
            ("attn.c_proj.weight", ("attn", "o", "kernel"), False),
            ("attn.c_proj.bias", ("attn", "o", "bias"), False),
            ("mlp.c_fc.weight", ("mlp", "fc_in", "kernel"), False),
            ("mlp.c_fc.bias", ("mlp", "fc_in", "bias"), False),
            ("mlp.c_proj.weight", ("mlp", "fc_out", "kernel"), False),
            ("mlp.c_proj.bias", ("mlp", "fc_out", "bias"), False),
        ]
    if cfg.family == "gptj":
        return [
            ("ln_1.weight", ("ln_1", "scale"), False), ("ln_1.bias", ("ln_1", "bias"), False),
            ("attn.q_proj.weight", ("attn", "q", "kernel"), True),
            ("attn.k_proj.weight", ("attn", "k", "kernel"), True),
            ("attn.v_proj.weight", ("attn", "v", "kernel"), True),
            ("attn.out_proj.weight", ("attn", "o", "kernel"), True),
            ("mlp.fc_in.weight", ("mlp", "fc_in", "kernel"), True),
            ("mlp.fc_in.bias", ("mlp", "fc_in", "bias"), False),
            ("mlp.fc_out.weight", ("mlp", "fc_out", "kernel"), True),
            ("mlp.fc_out.bias", ("mlp", "fc_out", "bias"), False),
        ]
    out = [
        ("input_layernorm.weight", ("ln_1", "scale"), False),
        ("post_attention_layernorm.weight", ("ln_2", "scale"), False),
        ("self_attn.q_proj.weight", ("attn", "q", "kernel"), True),
        ("self_attn.k_proj.weight", ("attn", "k", "kernel"), True),
        ("self_attn.v_proj.weight", ("attn", "v", "kernel"), True),
        ("self_attn.o_proj.weight", ("attn", "o", "kernel"), True),
        ("mlp.gate_proj.weight", ("mlp", "gate", "kernel"), True),
        ("mlp.up_proj.weight", ("mlp", "up", "kernel"), True),
        ("mlp.down_proj.weight", ("mlp", "fc_out", "kernel"), True),
    ]
    if cfg.attn_bias:
        out += [(f"self_attn.{p}_proj.bias", ("attn", p, "bias"), False) for p in "qkv"]
    if cfg.qk_norm:
        out += [("self_attn.q_norm.weight", ("attn", "q_norm", "scale"), False),
                ("self_attn.k_norm.weight", ("attn", "k_norm", "scale"), False)]
    return out


def _prefixes(cfg: ModelConfig) -> tuple[str, str]:
    """(prefix of the decoder body, prefix of a layer) in HF names."""
    if cfg.family == "llama":
        return "model.", "model.layers.{}."
    return "transformer.", "transformer.h.{}."


def _top_map(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...], bool]]:
    body, _ = _prefixes(cfg)
    if cfg.family == "llama":
        out = [(body + "embed_tokens.weight", ("embed", "wte"), False),
               (body + "norm.weight", ("ln_f", "scale"), False)]
    else:
        out = [(body + "wte.weight", ("embed", "wte"), False),
               (body + "ln_f.weight", ("ln_f", "scale"), False),
               (body + "ln_f.bias", ("ln_f", "bias"), False)]
    if cfg.family == "gpt2":
        out.append((body + "wpe.weight", ("embed", "wpe"), False))
    if not cfg.tie_embeddings:
        out.append(("lm_head.weight", ("lm_head", "kernel"), True))
    if cfg.lm_head_bias:
        out.append(("lm_head.bias", ("lm_head", "bias"), False))
    return out


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def normalize_names(names: list[str], cfg: ModelConfig) -> dict[str, str]:
    """Map raw checkpoint names to canonical HF names (adds the legacy GPT-2 ``transformer.`` prefix)."""
    out = {}
    for n in names:
        canon = n
        if cfg.family in ("gpt2", "gptj") and not n.startswith(("transformer.", "lm_head.")):
            canon = "transformer." + n
        out[canon] = n
    return out


def hf_to_params(
    cfg: ModelConfig, names: list[str], get: Callable[[str], np.ndarray], *, source: str = "checkpoint",
    dtype: Any = np.float32,
) -> dict[str, Any]:
    """Convert tensors (fetched lazily with ``get(raw_name)``) to the stacked param tree."""
    canon = normalize_names(names, cfg)
    if cfg.tie_embeddings and "lm_head.weight" in canon:
        canon.pop("lm_head.weight")  # tied copy
    used: set[str] = set()

    def fetch(name: str, shape: tuple[int, ...] | None = None, transpose: bool = False) -> np.ndarray:
        if name not in canon:
            raise ConversionError(f"{source}: missing tensor {name!r} for {cfg.family} ({cfg.name})")
        used.add(name)
        a = np.asarray(get(canon[name]), dtype=dtype)
        if transpose:
            a = a.T
        if shape is not None and tuple(a.shape) != tuple(shape):
            raise ConversionError(
                f"{source}: tensor {name!r} has shape {tuple(a.shape)} (after layout change), "
                f"expected {tuple(shape)}"
            )
        return a

    d, dk, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    hq, hkv = cfg.n_heads * cfg.hd, cfg.kv_heads * cfg.hd
    shapes = {
        ("ln_1", "scale"): (d,), ("ln_1", "bias"): (d,), ("ln_2", "scale"): (d,), ("ln_2", "bias"): (d,),
        ("attn", "q", "kernel"): (d, hq), ("attn", "k", "kernel"): (d, hkv), ("attn", "v", "kernel"): (d, hkv),
        ("attn", "q", "bias"): (hq,), ("attn", "k", "bias"): (hkv,), ("attn", "v", "bias"): (hkv,),
        ("attn", "o", "kernel"): (hq, d), ("attn", "o", "bias"): (d,),
        ("attn", "q_norm", "scale"): (cfg.hd,), ("attn", "k_norm", "scale"): (cfg.hd,),
        ("mlp", "fc_in", "kernel"): (d, dk), ("mlp", "fc_in", "bias"): (dk,),
        ("mlp", "gate", "kernel"): (d, dk), ("mlp", "up", "kernel"): (d, dk),
        ("mlp", "fc_out", "kernel"): (dk, d), ("mlp", "fc_out", "bias"): (d,),
        ("embed", "wte"): (V, d), ("embed", "wpe"): (cfg.max_positions, d),
        ("ln_f", "scale"): (d,), ("ln_f", "bias"): (d,),
        ("lm_head", "kernel"): (d, V), ("lm_head", "bias"): (V,),
    }
    params: dict[str, Any] = {}
    for name, path, tr in _top_map(cfg):
        _set(params, path, fetch(name, shapes[path], tr))
    _, lpre = _prefixes(cfg)
    per_layer: dict[tuple[str, ...], list[np.ndarray]] = {}
    for i in range(cfg.n_layers):
        pre = lpre.format(i)
        for suffix, path, tr in _layer_map(cfg):
            per_layer.setdefault(path, []).append(fetch(pre + suffix, shapes[path], tr))
        if cfg.family == "gpt2":
            w = fetch(pre + "attn.c_attn.weight", (d, 3 * d))
            b = fetch(pre + "attn.c_attn.bias", (3 * d,))
            for j, p in enumerate("qkv"):
                per_layer.setdefault(("attn", p, "kernel"), []).append(w[:, j * d:(j + 1) * d])
                per_layer.setdefault(("attn", p, "bias"), []).append(b[j * d:(j + 1) * d])
    layers: dict[str, Any] = {}
    for path in list(per_layer):  # pop as we stack: peak ~ one tree, not two
        _set(layers, path, np.stack(per_layer.pop(path)))
    params["layers"] = layers
    extra = [canon[n] for n in canon if n not in used and not n.endswith(_IGNORED_SUFFIXES)]
    if extra:
        raise ConversionError(
            f"{source}: unexpected tensor(s) for {cfg.family}: {', '.join(sorted(extra)[:8])}"
            + (" ..." if len(extra) > 8 else "")
        )
    return params


def params_to_hf(cfg: ModelConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of ``hf_to_params``: the flat HF (torch-layout) state dict."""

    def get(tree: Mapping[str, Any], path: tuple[str, ...]) -> np.ndarray:
        for p in path:
            tree = tree[p]
        return np.asarray(tree, dtype=np.float32)

    out: dict[str, np.ndarray] = {}
    for name, path, tr in _top_map(cfg):
        a = get(params, path)
        out[name] = np.ascontiguousarray(a.T if tr else a)
    _, lpre = _prefixes(cfg)
    for i in range(cfg.n_layers):
        pre = lpre.format(i)
        for suffix, path, tr in _layer_map(cfg):
            a = get(params["layers"], path)[i]
            out[pre + suffix] = np.ascontiguousarray(a.T if tr else a)
        if cfg.family == "gpt2":
            lay = params["layers"]["attn"]
            out[pre + "attn.c_attn.weight"] = np.concatenate(
                [np.asarray(lay[p]["kernel"][i], np.float32) for p in "qkv"], axis=1)
            out[pre + "attn.c_attn.bias"] = np.concatenate(
                [np.asarray(lay[p]["bias"][i], np.float32) for p in "qkv"])
    return out
