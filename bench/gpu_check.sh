#!/usr/bin/env bash
# One pass over the GPU path, sized for a short lease of one NVIDIA GPU:
#   1. bench/gpu_attention.py  cuDNN (packed rows too) and blockwise against dense; timings
#   2. bench/gpu_train.py      train-step tokens/s and MFU, rope vs rnope_swa, 150m and 1b
#   3. `hybridlm train` through the CLI on the GPU (bf16, packed data, a checkpoint, resume)
# Results land in $OUT (default bench/results/gpu); each part has its own time limit so
# one slow part cannot eat the others. Wheels in .whl/ (if any) are installed first
# (the machine may lack grain, ml_collections, or carry other flax/optax/orbax versions).
set -u
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
# shellcheck source=bench/gpu_env.sh
. "$(dirname "$0")/gpu_env.sh"
python3 -c "import jax, flax, optax, orbax.checkpoint as o, grain; print('jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, 'devices', jax.devices())"

timeout "${ATTN_S:-170}" python3 bench/gpu_attention.py --lengths 8192,32768 --repeats 3 \
  --out "$OUT/gpu_attention.json" 2>&1 | tee "$OUT/gpu_attention.log"
echo "gpu_attention rc ${PIPESTATUS[0]}"

timeout "${TRAIN_S:-200}" python3 bench/gpu_train.py --budget-s "${TRAIN_BUDGET_S:-130}" \
  --out "$OUT/gpu_train.json" 2>&1 | tee "$OUT/gpu_train.log"
echo "gpu_train rc ${PIPESTATUS[0]}"

W=/tmp/hybridlm_gpu_run
rm -rf $W
train() {
  timeout "${CLI_S:-60}" python3 -m hybridlm.cli train --workdir $W \
    --config configs/tiny.py --config.model.dtype=bfloat16 --config.train.steps="$1" \
    --config.checkpoint.every=20 --config.log.every=10
}
{ train 20 && train 40; echo "cli train rc $?"; } 2>&1 | tee "$OUT/cli_train.log"
cp $W/metrics.jsonl "$OUT/cli_metrics.jsonl" 2>/dev/null
echo "done"
