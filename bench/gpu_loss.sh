#!/usr/bin/env bash
# The fused, chunked LM-head loss on one NVIDIA GPU, sized for a short lease:
#   1. 150m rope at T=8192, B=4: train.loss_chunk=-1 (fused, the default) against 0 (whole
#      logits, autodiff), same machine, back to back: step time and peak memory
#   2. 1b rope at T=8192, B=1 with the default (the row earlier leases did not reach)
# Results land in $OUT (default bench/results/gpu-loss; the 2026-11-27 H100 lease's are in
# bench/results/gpu-h100-2026-11-27-loss/); each part has its own time limit.
set -u
OUT=${OUT:-bench/results/gpu-loss}
mkdir -p "$OUT"
# shellcheck source=bench/gpu_env.sh
. "$(dirname "$0")/gpu_env.sh"
for chunk in -1 0; do
  timeout "${PART_S:-170}" python3 bench/gpu_train.py --only "150m rope T=8192" \
    --override train.loss_chunk=$chunk --out "$OUT/150m_rope_8k_chunk$chunk.json" 2>&1 \
    | grep -v -i "^W0000\|tpu" | tee "$OUT/150m_rope_8k_chunk$chunk.log"
done
timeout "${PART_S:-170}" python3 bench/gpu_train.py --only "1b rope" \
  --out "$OUT/1b_rope_8k.json" 2>&1 | grep -v -i "^W0000\|tpu" | tee "$OUT/1b_rope_8k.log"
echo "done"
