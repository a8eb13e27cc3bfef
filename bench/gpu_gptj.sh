#!/bin/bash
# One prepared accelerator run: GPT-J-6B-shape timings with random weights (bench/RESULTS.md, "GPU").
#   bash bench/gpu_gptj.sh                       # all parts; logs under $OUT (default /tmp/gpu_gptj)
#   PARTS="metake_bf16_bare stats" bash bench/gpu_gptj.sh   # a subset, in that order
# Parts (each under its own timeout T_<PART>, seconds):
#   f32              AlphaEdit + MetaKE (all prompts), float32, 2 batches of 100 each
#   bf16             AlphaEdit + MetaKE, bfloat16, 2 batches of 100 each (aim: MetaKE steady batch <= 20 s)
#   metake_bf16_bare MetaKE, bfloat16, look-ahead on the bare + KL prompts, 2 batches of 100
#   metake_f32_bare  the same in float32
#   stats            statistics throughput (6 layers, d_k 16384; Σ k kᵀ at "default" and at "highest" precision),
#                    eigh(16384) projector, AlphaEdit solve at n = 100 (the float64 MEMIT solve is skipped)
# Stage I runs with the defaults stage1.prefix_reuse = stage1.compact = True (docs/FORMULAS.md §3);
# PARTS="f32_noreuse" times the float32 run with both off, for the before/after comparison.
# The default parts are sized to finish in under 8 minutes on an H100/H200 (timeouts 240 + 150 + 90 s).
# Needs jax with a GPU backend, flax, optax, chex, orbax-checkpoint, absl, ml_collections; wheels
# found in .whl/ are installed first (for machines without a package registry).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH=$PWD
# JAX reserves 75 % of the GPU by default: 60 GB on an 80 GB H100, less than a float32 GPT-J edit needs
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-.92}
OUT=${OUT:-/tmp/gpu_gptj}; mkdir -p "$OUT"
PARTS=${PARTS:-"f32 stats bf16"}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
filt() { grep -v -i -E "warn|libtpu|xla_bridge" ; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import jax, flax, optax, chex, orbax.checkpoint, ml_collections; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'chex', chex.__version__, jax.devices())" 2>&1 | filt | tee -a "$OUT/device.txt"
EDIT="python3 bench/edit_speed.py --config=configs/gptj_cf.py --random --batch_size=100 --n_batches=2"
for part in $PARTS; do
  echo "=== $part $(date -u +%T)"
  case $part in
    f32) timeout ${T_F32:-240} $EDIT 2>&1 | filt | tee "$OUT/edit_gptj_f32.txt" ;;
    f32_noreuse) timeout ${T_F32_NOREUSE:-300} $EDIT --config.stage1.prefix_reuse=False --config.stage1.compact=False \
        2>&1 | filt | tee "$OUT/edit_gptj_f32_noreuse.txt" ;;
    bf16) timeout ${T_BF16:-150} $EDIT --config.dtype=bfloat16 --methods=alphaedit,metake 2>&1 | filt \
        | tee "$OUT/edit_gptj_bf16.txt" ;;
    metake_bf16_bare) timeout ${T_METAKE_BF16_BARE:-200} $EDIT --config.dtype=bfloat16 --config.metake.prompts=bare \
        --methods=metake 2>&1 | filt | tee "$OUT/edit_gptj_metake_bf16_bare.txt" ;;
    metake_f32_bare) timeout ${T_METAKE_F32_BARE:-200} $EDIT --config.metake.prompts=bare --methods=metake 2>&1 \
        | filt | tee "$OUT/edit_gptj_metake_f32_bare.txt" ;;
    stats) timeout ${T_STATS:-90} python3 bench/stats_speed.py --shape gptj:gpt-j-6b --layers 3 4 5 6 7 8 --max-len 512 \
        --n-docs 128 --token-budget 8192 --skip mixed memit --precision default highest 2>&1 | filt | tee "$OUT/stats_gptj.txt" ;;
    *) echo "unknown part $part" ;;
  esac
done
echo "gpu_gptj.sh done $(date -u +%T)"
