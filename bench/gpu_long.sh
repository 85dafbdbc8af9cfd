#!/usr/bin/env bash
# Long context on one NVIDIA GPU, sized for one 10-minute lease (issue 20): the 150m train
# step at T=32768 and T=131072 (rope and rnope_swa, B=1), then the 1b rows at T=8192, each
# through cuDNN with its blockwise fallback compiled in (a loop now: its program no longer
# grows with T, which kept the 32k step compiling past 400 s before). Cases run in that
# order until TRAIN_BUDGET_S is spent; the JSON is rewritten after each case.
#   bash bench/gpu_long.sh            # results in $OUT (default bench/results/gpu-long)
set -u
OUT=${OUT:-bench/results/gpu-long}
mkdir -p "$OUT"
# shellcheck source=bench/gpu_env.sh
. "$(dirname "$0")/gpu_env.sh"
timeout "${TRAIN_S:-540}" python3 bench/gpu_train.py --only "T=32768,T=131072,1b" \
  --budget-s "${TRAIN_BUDGET_S:-420}" --steps 3 --out "$OUT/gpu_train.json" 2>&1 \
  | grep -v -i "^W0000\|tpu" | tee "$OUT/gpu_train.log"
echo "gpu_train rc ${PIPESTATUS[0]}"
