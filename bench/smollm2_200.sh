#!/bin/bash
# The 200-edit SmolLM2 method tables of bench/RESULTS.md (issue 5): CounterFact flat split and ZsRE 1k,
# first 200 cases, 10 sequential batches of 20, MEMIT / AlphaEdit / MetaKE, 5-token context templates.
#
#   bash bench/smollm2_200.sh                       # all six runs
#   bash bench/smollm2_200.sh zsre_memit zsre_metake  # some of them
#
# Idempotent: a run whose results.json exists is skipped; an interrupted one resumes from its last
# per-batch checkpoint (--config.resume=True starts fresh when there is none).  ~40 min per run on a
# 2-core CPU.  Tables: python launch/compare.py runs/cf200_memit runs/cf200_alphaedit runs/cf200_metake
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DATA=$(realpath -m "${METAKE_DATA:-../shared/data}")  # absolute: data.path is part of the resume fingerprint
CF="--config=configs/smollm2_cf.py --config.data.path=$DATA/counterfact_easyedit/counterfact-edit.json --config.data.format=flat"
ZS="--config=configs/smollm2_zsre.py --config.data.path=$DATA/zsre_mend_train_1k.json --config.templates.length=5"
jobs=("$@")
[ ${#jobs[@]} -eq 0 ] && jobs=(cf_memit cf_alphaedit cf_metake zsre_memit zsre_alphaedit zsre_metake)
mkdir -p runs
for job in "${jobs[@]}"; do
  ds=${job%%_*}; m=${job#*_}
  case $ds in cf) args=$CF ;; zsre) args=$ZS ;; *) echo "unknown job $job (cf_<method> | zsre_<method>)"; exit 2 ;; esac
  dir=runs/${ds}200_$m
  if [ -f "$dir/results.json" ]; then echo "=== $job: done ($dir/results.json)"; continue; fi
  echo "=== $job start $(date -u +%T)"
  .venv/bin/python launch/edit.py $args --config.data.n=200 --config.batch_size=20 --config.method=$m \
      --config.run_dir=$dir --config.resume=True 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" > "runs/${ds}200_$m.log"
  echo "=== $job rc ${PIPESTATUS[0]} end $(date -u +%T)"
done
