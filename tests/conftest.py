"""Test setup: HF hub offline, float32 matmuls at highest precision (the project is pip-installed
(editable); `tests` imports from the repo root through pyproject's pytest pythonpath)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module: the suite compiles thousands of shapes in
    one process, and keeping them all bounds nothing (they are not reused across modules)."""
    yield
    jax.clear_caches()
    gc.collect()
