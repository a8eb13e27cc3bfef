#!/usr/bin/env bash
# Create/refresh the project virtualenv (.venv) from the pinned requirements.
# Re-installs only when requirements*.txt changed (stamp file holds their hash).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
want=$(cat requirements.txt requirements-test.txt | sha256sum | cut -d' ' -f1)
have=$(cat .venv/.req-stamp 2>/dev/null || true)
if [ "$want" != "$have" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch==2.13.0 is the CPU wheel (test oracle only); see requirements-test.txt
  .venv/bin/python -m pip install -q -r requirements-test.txt
  echo "$want" > .venv/.req-stamp
fi
