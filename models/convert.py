"""Checkpoint conversion: HF / GGUF checkpoints -> our param tree (models/config.py), back to HF.

Entry points (docs/FORMULAS.md §1 model: the edited weight is ``params['layers']['mlp']['fc_out']['kernel']``):

* ``load_hf_checkpoint(dir_or_hub_id, dtype=...)``: a local HF directory (``config.json`` plus
  ``model.safetensors`` | ``model.safetensors.index.json`` | ``pytorch_model.bin`` |
  ``pytorch_model.bin.index.json``), read lazily tensor by tensor.
* ``load_gguf(path)``: a llama.cpp GGUF file (llama / qwen2 / qwen3 architectures), dequantized
  with ``gguf.quants.dequantize``; llama.cpp's rotary row permutation of ``attn_q`` / ``attn_k`` is
  undone exactly.
* ``load_tokenizer``, ``save_converted`` / ``restore_converted`` (orbax + JSON config) and
  ``export_hf`` (config.json + model.safetensors loadable by ``transformers``).

One entry point for every kind of model spec: ``models.load.load_model``.

Every failure raises ``ConversionError`` naming the file / tensor / architecture / model id.
"""
from __future__ import annotations

import contextvars
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from flax import traverse_util

from models import families
from models.config import ModelConfig
from models.errors import ConversionError
from models.hf_layout import config_from_hf, hf_to_params, params_to_hf

Params = dict[str, Any]

__all__ = [
    "ConversionError", "export_hf", "load_gguf", "load_hf_checkpoint", "load_tokenizer", "restore_converted",
    "save_converted",
]

DTYPES = ("float32", "bfloat16")
CONVERTED_MARKER = "metake_config.json"  # written by save_converted beside the orbax tree
_PARAMS_SUBDIR = "params"
_TOKENIZER_SUBDIR = "tokenizer"


# ----------------------------------------------------------------------------- helpers


def np_dtype(dtype: str) -> Any:
    """The numpy dtype of ``dtype`` (one of DTYPES); ConversionError otherwise."""
    if dtype not in DTYPES:
        raise ConversionError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return np.dtype(jnp.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)


def _with_dtype(cfg: ModelConfig, dtype: str) -> ModelConfig:
    return cfg.replace(param_dtype=dtype, compute_dtype=dtype)


def cast(cfg: ModelConfig, params: Params, dtype: str | None) -> tuple[ModelConfig, Params]:
    """(cfg, params) in ``dtype`` (params and compute); None keeps them.  ConversionError for a
    dtype outside DTYPES."""
    if dtype is None or dtype == cfg.param_dtype:
        return cfg, params
    np_dtype(dtype)
    return _with_dtype(cfg, dtype), jax.tree.map(lambda a: a.astype(dtype), params)


# How loaded leaves reach the devices: None = ``jnp.asarray`` (the default device), else a callable
# ``place(path: tuple[str, ...], host: np.ndarray) -> jax.Array`` (e.g. a sharded placement that sends
# each device only its slice; set by ``models.load.load_model(place=...)``).
PLACE: contextvars.ContextVar[Callable[[tuple[str, ...], np.ndarray], Any] | None] = contextvars.ContextVar(
    "PLACE", default=None)


def _to_device(params: Params, dtype: Any = None, _prefix: tuple[str, ...] = ()) -> Params:
    """numpy leaves -> jax arrays (placed by ``PLACE``), in place, freeing each numpy leaf as soon
    as it is copied."""
    place = PLACE.get()
    for k, v in params.items():
        if isinstance(v, dict):
            _to_device(v, dtype, _prefix + (k,))
        else:
            params[k] = jnp.asarray(v, dtype=dtype) if place is None else place(
                _prefix + (k,), np.asarray(v, dtype=dtype))
            del v
    return params


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


# ----------------------------------------------------------------------------- HF checkpoints


class _TensorSource:
    """Lazy ``name -> np.ndarray`` reader over one checkpoint directory's weight files."""

    def __init__(self, directory: Path):
        self.dir = directory
        self._handles: dict[str, Any] = {}
        self.where: dict[str, str] = {}  # tensor name -> file name
        st, st_idx = directory / "model.safetensors", directory / "model.safetensors.index.json"
        pt, pt_idx = directory / "pytorch_model.bin", directory / "pytorch_model.bin.index.json"
        if st.is_file():
            self.kind = "safetensors"
            self.where = {n: st.name for n in self._open(st.name).keys()}
        elif st_idx.is_file():
            self.kind = "safetensors"
            self.where = self._read_index(st_idx)
        elif pt.is_file():
            self.kind = "torch"
            self.where = {n: pt.name for n in self._open(pt.name).keys()}
        elif pt_idx.is_file():
            self.kind = "torch"
            self.where = self._read_index(pt_idx)
        else:
            raise ConversionError(
                f"{directory}: no weights file found; expected one of model.safetensors, "
                "model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json"
            )
        self.source = str(directory)

    def _read_index(self, idx: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(idx.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ConversionError(f"{idx}: unreadable shard index ({e})") from e
        for f in sorted(set(weight_map.values())):
            if not (self.dir / f).is_file():
                raise ConversionError(f"{idx}: shard file {f!r} listed in the index is missing")
        return dict(weight_map)

    def _open(self, fname: str) -> Any:
        if fname in self._handles:
            return self._handles[fname]
        path = self.dir / fname
        if not path.is_file():
            raise ConversionError(f"{self.dir}: missing weights file {fname!r}")
        if fname.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                h = safe_open(str(path), framework="numpy")
            except Exception as e:  # corrupt header etc.
                raise ConversionError(f"{path}: cannot open safetensors file ({e})") from e
        else:
            try:
                import torch
            except ImportError as e:
                raise ConversionError(
                    f"{path}: reading pytorch_model.bin needs torch, which is not installed; "
                    "convert the checkpoint to safetensors or install torch"
                ) from e
            try:
                h = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise ConversionError(f"{path}: cannot load torch checkpoint ({e})") from e
        self._handles[fname] = h
        return h

    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> np.ndarray:
        h = self._open(self.where[name])
        if self.kind == "safetensors":
            a = h.get_tensor(name)
            return a if a.dtype != np.float16 else a.astype(np.float32)
        t = h[name]
        return t.detach().float().numpy()


def resolve_hf_dir(path_or_id: str) -> Path:
    """A local directory as is; a hub id via snapshot_download (never while offline)."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise ConversionError(f"{path_or_id}: not a directory (pass an HF checkpoint directory)")
    looks_like_path = path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") > 1
    if looks_like_path:
        raise ConversionError(f"{path_or_id}: no such checkpoint directory")
    hint = (f"download it elsewhere (e.g. `huggingface-cli download {path_or_id} --local-dir DIR`) "
            "and pass the local directory DIR instead")
    if _offline():
        raise ConversionError(
            f"{path_or_id!r} is not a local directory and looks like a hub id, but HF_HUB_OFFLINE=1 "
            f"forbids downloading it; {hint}"
        )
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            path_or_id,
            allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt", "*.model", "*.tiktoken"],
        )
    except Exception as e:
        raise ConversionError(f"cannot download hub model {path_or_id!r} ({type(e).__name__}: {e}); {hint}") from e
    return Path(local)


def read_hf_config(directory: Path) -> dict[str, Any]:
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise ConversionError(f"{directory}: missing config.json (not an HF checkpoint directory)")
    try:
        return json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ConversionError(f"{cfg_path}: invalid JSON ({e})") from e


def load_hf_checkpoint(path_or_id: str, *, dtype: str = "float32") -> tuple[ModelConfig, Params]:
    """Local HF checkpoint directory (or hub id, online only) -> (config, param tree).

    Tensors are read one at a time (safetensors ``safe_open`` / ``torch.load(mmap=True)``), so peak
    memory is about one copy of the converted tree.
    """
    npd = np_dtype(dtype)
    directory = resolve_hf_dir(str(path_or_id))
    hf = read_hf_config(directory)
    cfg = _with_dtype(config_from_hf(hf, name=directory.name), dtype)
    src = _TensorSource(directory)
    params = hf_to_params(cfg, src.names(), src.get, source=src.source, dtype=npd)
    return cfg, _to_device(params)


# ----------------------------------------------------------------------------- GGUF

# GGUF architecture -> (HF model_type, llama.cpp permuted q/k rows?)
_GGUF_ARCH = {"llama": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False)}

_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_name_to_hf(name: str) -> str | None:
    """llama.cpp tensor name -> HF llama name (None when unknown)."""
    if name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}"
    return None


def llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (HF half-split rotary -> GGUF interleaved pairs).

    Rows of one head are ``[x_0..x_{hd/2-1}, y_0..y_{hd/2-1}]`` in HF and ``[x_0, y_0, x_1, y_1, ...]``
    in GGUF. Works on (rows, ...) weights and (rows,) biases.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llamacpp_unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Exact inverse of ``llamacpp_permute``."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_field(reader: Any, key: str, default: Any = ConversionError) -> Any:
    f = reader.fields.get(key)
    if f is None:
        if default is ConversionError:
            raise ConversionError(f"{reader.path}: GGUF metadata key {key!r} is missing")
        return default
    return f.contents()


def load_gguf(path: str | os.PathLike, *, dtype: str = "float32") -> tuple[ModelConfig, Params]:
    """A llama.cpp GGUF file -> (config, param tree), dequantizing each tensor on demand."""
    npd = np_dtype(dtype)
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConversionError(f"GGUF file not found: {path}")
    try:
        import gguf
        from gguf.quants import dequantize
    except ImportError as e:
        raise ConversionError("loading a GGUF file needs the `gguf` package (pip install gguf)") from e
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise ConversionError(f"{path}: not a readable GGUF file ({e})") from e
    arch = str(_gguf_field(reader, "general.architecture"))
    if arch not in _GGUF_ARCH:
        raise ConversionError(
            f"{path}: unknown GGUF architecture {arch!r}; supported: {', '.join(sorted(_GGUF_ARCH))}"
        )
    model_type, permuted = _GGUF_ARCH[arch]
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ConversionError(f"{path}: missing tensor 'token_embd.weight'")
    vocab = _gguf_field(reader, f"{arch}.vocab_size", None)
    if vocab is None:
        vocab = int(tensors["token_embd.weight"].shape[-1])  # GGUF shapes are (in, out)-reversed
    d = int(_gguf_field(reader, f"{arch}.embedding_length"))
    n_heads = int(_gguf_field(reader, f"{arch}.attention.head_count"))
    n_kv = int(_gguf_field(reader, f"{arch}.attention.head_count_kv", n_heads))
    head_dim = _gguf_field(reader, f"{arch}.attention.key_length", None)
    head_dim = int(head_dim) if head_dim is not None else d // n_heads
    rot = _gguf_field(reader, f"{arch}.rope.dimension_count", None)
    if rot is not None and int(rot) != head_dim:
        raise ConversionError(f"{path}: partial rotary ({arch}.rope.dimension_count={rot} < head_dim={head_dim}) "
                              "is not supported")
    scaling = _gguf_field(reader, f"{arch}.rope.scaling.type", None)
    if scaling not in (None, "none"):
        raise ConversionError(f"{path}: rope scaling {arch}.rope.scaling.type={scaling!r} is not supported")
    eos = _gguf_field(reader, "tokenizer.ggml.eos_token_id", None)
    bos = _gguf_field(reader, "tokenizer.ggml.bos_token_id", None)
    hf_cfg = {
        "model_type": model_type,
        "vocab_size": int(vocab),
        "hidden_size": d,
        "num_hidden_layers": int(_gguf_field(reader, f"{arch}.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "intermediate_size": int(_gguf_field(reader, f"{arch}.feed_forward_length")),
        "max_position_embeddings": int(_gguf_field(reader, f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(_gguf_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_gguf_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
    }
    name = str(_gguf_field(reader, "general.name", path.stem))
    cfg = _with_dtype(config_from_hf(hf_cfg, name=name), dtype)
    hf_names: dict[str, str] = {}
    for tname in tensors:
        hname = gguf_name_to_hf(tname)
        if hname is None:
            if tname.startswith("rope_freqs"):
                raise ConversionError(f"{path}: tensor {tname!r} (rope frequency scaling) is not supported")
            raise ConversionError(f"{path}: unexpected GGUF tensor {tname!r} for architecture {arch!r}")
        hf_names[hname] = tname

    def get(hname: str) -> np.ndarray:
        tname = hf_names[hname]
        t = tensors[tname]
        a = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if permuted and (".attn_q." in tname or ".attn_k." in tname):
            a = llamacpp_unpermute(a, n_heads if ".attn_q." in tname else n_kv)
        return a

    params = hf_to_params(cfg, list(hf_names), get, source=str(path), dtype=npd)
    return cfg, _to_device(params)


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer(path_or_dir: str | os.PathLike, gguf_file: str | None = None) -> Any:
    """HF tokenizer from a local directory, or from a GGUF file (path to the file, or dir + name).

    ``pad_token`` defaults to ``eos_token``; padding side is right.
    """
    from transformers import AutoTokenizer

    p = Path(path_or_dir).expanduser()
    if gguf_file is None and p.is_file() and p.suffix == ".gguf":
        p, gguf_file = p.parent, p.name
    if gguf_file is not None and not (p / gguf_file).is_file():
        raise ConversionError(f"GGUF file not found: {p / gguf_file}")
    if gguf_file is None and not p.is_dir():
        raise ConversionError(f"tokenizer directory not found: {p}")
    try:
        kw = {"gguf_file": gguf_file} if gguf_file else {}
        tok = AutoTokenizer.from_pretrained(str(p), **kw)
    except Exception as e:
        raise ConversionError(f"cannot load a tokenizer from {p / (gguf_file or '')} ({e})") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


# ----------------------------------------------------------------------------- orbax cache


def save_converted(directory: str | os.PathLike, cfg: ModelConfig, params: Params, tokenizer: Any = None) -> Path:
    """Save a converted tree with orbax (``<dir>/params``) and the config as JSON beside it."""
    import orbax.checkpoint as ocp

    _check_finite(params, what=f"save to {directory}")
    directory = Path(directory).expanduser().absolute()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / _PARAMS_SUBDIR
    if target.exists():
        shutil.rmtree(target)
    ocp.PyTreeCheckpointer().save(str(target), jax.tree.map(np.asarray, params))  # synchronous
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory / _TOKENIZER_SUBDIR))
    (directory / CONVERTED_MARKER).write_text(json.dumps(cfg.to_dict(), indent=1))
    return directory


def is_converted_dir(directory: str | os.PathLike) -> bool:
    d = Path(directory).expanduser()
    return (d / CONVERTED_MARKER).is_file() and (d / _PARAMS_SUBDIR).is_dir()


def restore_converted(directory: str | os.PathLike) -> tuple[ModelConfig, Params]:
    """Inverse of ``save_converted``."""
    import orbax.checkpoint as ocp

    directory = Path(directory).expanduser().absolute()
    marker = directory / CONVERTED_MARKER
    if not marker.is_file():
        raise ConversionError(f"{directory}: missing {CONVERTED_MARKER} (not a converted model directory)")
    if not (directory / _PARAMS_SUBDIR).is_dir():
        raise ConversionError(f"{directory}: missing orbax params folder {_PARAMS_SUBDIR!r}")
    cfg = ModelConfig.from_dict(json.loads(marker.read_text()))
    try:
        families.get(cfg.family)
    except ValueError as e:
        raise ConversionError(f"{marker}: {e}") from e
    params = ocp.PyTreeCheckpointer().restore(str(directory / _PARAMS_SUBDIR))
    return cfg, _to_device(params, jnp.dtype(cfg.param_dtype))


def converted_tokenizer(directory: str | os.PathLike) -> Any:
    d = Path(directory).expanduser() / _TOKENIZER_SUBDIR
    return load_tokenizer(d) if d.is_dir() else None


# ----------------------------------------------------------------------------- HF export


def _check_finite(params: Params, what: str) -> None:
    for path, leaf in traverse_util.flatten_dict(params, sep="/").items():
        a = np.asarray(leaf, dtype=np.float32)
        if not np.isfinite(a).all():
            raise ConversionError(
                f"refusing to {what}: parameter {path!r} contains {int((~np.isfinite(a)).sum())} NaN/Inf value(s)"
            )


def export_hf(out_dir: str | os.PathLike, cfg: ModelConfig, params: Params, tokenizer: Any = None,
              *, model_type: str | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ tokenizer) loadable by transformers.

    Refuses params containing NaN/Inf. Tied embeddings are written once (no ``lm_head.weight``).
    """
    from safetensors.numpy import save_file

    _check_finite(params, what=f"export to {out_dir}")
    fam = families.get(cfg.family)
    if model_type is not None and model_type not in fam.model_types:
        raise ConversionError(f"cannot export a {cfg.family} model as model_type {model_type!r} "
                              f"(its family writes {', '.join(fam.model_types)})")
    hf_cfg = fam.hf_config(cfg, model_type)
    state = params_to_hf(cfg, params)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
