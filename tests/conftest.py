"""Test setup: HF hub offline, float32 matmuls at highest precision (the project is pip-installed
(editable); `tests` imports from the repo root through pyproject's pytest pythonpath)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
