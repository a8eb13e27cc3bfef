#!/bin/bash
# The 200-edit SmolLM2 method tables of bench/RESULTS.md (issue 5): CounterFact flat split and ZsRE 1k,
# first 200 cases, 10 sequential batches of 20, MEMIT / AlphaEdit / MetaKE, 5-token context templates.
#
#   bash bench/smollm2_200.sh                       # all six runs
#   bash bench/smollm2_200.sh zsre_memit zsre_metake  # some of them (any method of metake_jax.methods)
#   SEEDS="0 1 2" bash bench/smollm2_200.sh cf_alphaedit cf_metake   # 200 seeded-random cases per seed
#   SEEDS="0 1 2" TSEED=1 bash bench/smollm2_200.sh cf_metake       # noise floor: other context templates
#
# With SEEDS, run dirs are runs/<ds>200_<method>_s<S>[_t<TSEED>] and `launch/compare.py --paired` reads them
# (METHOD.md §11: paired intervals over the same cases; the TSEED runs give the noise floor).
#
# Every run logs β, γ per request (eval.association): the γ-vs-association figure of the runs is
#   python launch/analyze.py --analysis=gamma --runs=runs/cf200_memit_s0,runs/cf200_alphaedit_s0,runs/cf200_metake_s0
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
for seed in ${SEEDS:-none}; do
for job in "${jobs[@]}"; do
  ds=${job%%_*}; m=${job#*_}
  case $ds in cf) args=$CF ;; zsre) args=$ZS ;; *) echo "unknown job $job (cf_<method> | zsre_<method>)"; exit 2 ;; esac
  dir=runs/${ds}200_$m
  if [ "$seed" != none ]; then
    dir=${dir}_s$seed; args="$args --config.data.seed=$seed"
    if [ -n "${TSEED:-}" ]; then dir=${dir}_t$TSEED; args="$args --config.templates.seed=$TSEED"; fi
  fi
  if [ -f "$dir/results.json" ]; then echo "=== $job: done ($dir/results.json)"; continue; fi
  echo "=== $job ${dir} start $(date -u +%T)"
  .venv/bin/python launch/edit.py $args --config.data.n=200 --config.batch_size=20 --config.method=$m \
      --config.eval.association=True --config.run_dir=$dir --config.resume=True 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" > "$dir.log"
  echo "=== $job rc ${PIPESTATUS[0]} end $(date -u +%T)"
done
done
