#!/usr/bin/env bash
# The main job on the embedded default: SmolLM2-135M-Instruct + the bundled demo edit set.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python launch/edit.py --config=configs/smollm2_cf.py --config.compile_cache=auto "$@"
