#!/bin/bash
# One prepared accelerator run: GPT-J-6B-shape timings with random weights (bench/RESULTS.md, "GPU").
#   bash bench/gpu_gptj.sh            # writes its logs under $OUT (default /tmp/gpu_gptj)
# Needs jax with a GPU backend, flax, optax, chex, orbax-checkpoint, absl, ml_collections; wheels
# found in .whl/ are installed first (for machines without a package registry).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=$PWD
OUT=${OUT:-/tmp/gpu_gptj}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
filt() { grep -v -i -E "warn|libtpu|xla_bridge" ; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import jax, flax, optax, chex, orbax.checkpoint, ml_collections; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'chex', chex.__version__, jax.devices())" 2>&1 | filt | tee -a "$OUT/device.txt"
# 1. AlphaEdit vs MetaKE, float32, batch 100, 2 sequential batches each (batch 1 includes compilation)
timeout ${T_EDIT:-300} python3 bench/edit_speed.py --config=configs/gptj_cf.py --random --batch_size=100 --n_batches=2 2>&1 | filt | tee "$OUT/edit_gptj_f32.txt"
# 2. statistics throughput (6 layers, d_k 16384), eigh(16384) projector, closed-form solves at n = 100
timeout ${T_STATS:-100} python3 bench/stats_speed.py --shape gptj:gpt-j-6b --layers 3 4 5 6 7 8 --max-len 512 --n-docs 256 --token-budget 32768 2>&1 | filt | tee "$OUT/stats_gptj.txt"
# 3. bfloat16 Stage I (AlphaEdit, 2 batches: the second is compile-free)
timeout ${T_BF16:-120} python3 bench/edit_speed.py --config=configs/gptj_cf.py --config.dtype=bfloat16 --random --batch_size=100 --n_batches=2 --methods=alphaedit 2>&1 | filt | tee "$OUT/edit_gptj_bf16.txt"
echo "gpu_gptj.sh done"
