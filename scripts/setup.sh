#!/usr/bin/env bash
# Create/refresh the project virtualenv (.venv) from the pinned requirements, then install this
# project into it in editable mode (`pip install -e . --no-deps`: models, metake_jax, configs,
# launch importable from anywhere, no sys.path edits).
# Re-installs only when requirements*.txt or pyproject.toml changed, or the checkout moved (the
# stamp file holds a hash of them and of the checkout's path).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
want=$( (cat requirements.txt requirements-test.txt pyproject.toml; pwd -P) | sha256sum | cut -d' ' -f1)
have=$(cat .venv/.req-stamp 2>/dev/null || true)
if [ "$want" != "$have" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch==2.13.0 is the CPU wheel (test oracle only); see requirements-test.txt
  .venv/bin/python -m pip install -q -r requirements-test.txt
  # the project itself, editable; the venv's setuptools builds it (no download of build deps)
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
  echo "$want" > .venv/.req-stamp
fi
