#!/usr/bin/env bash
# The paper in miniature, a bigger setting on one GPU: rope and rnope_swa (tiny, seq 512,
# window 128, the paper_mini mixture) trained STEPS steps side by side, then the needle grid
# at 1x and 2x the training length. Logs and niah JSON land in $OUT.
#   STEPS=2000 bash bench/gpu_mini.sh
set -u
OUT=${OUT:-/tmp/gpu_mini}; STEPS=${STEPS:-2000}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
C=configs/paper.py:size=tiny,seq_len=512,window=128
common=(--config.data.source=stdlib,retrieval:20000:512 --config.data.weights=0.5,0.5
        --config.train.steps="$STEPS" --config.train.batch_size=16 --config.train.seed=0
        --config.train.warmup_steps=$((STEPS / 10)) --config.log.every=250)
python3 -m hybridlm.cli prepare --config "$C,variant=rope" --quiet "${common[@]:0:2}" \
  > "$OUT/prepare.log" 2>&1 || { echo "prepare failed"; tail "$OUT/prepare.log"; }
for v in rope rnope_swa; do
  ( python3 -m hybridlm.cli train --config "$C,variant=$v" --workdir "/tmp/gm/$v" \
      "${common[@]}" > "$OUT/train_$v.log" 2>&1 \
    && python3 -m hybridlm.cli eval --workdir "/tmp/gm/$v" --task niah --lengths 512 1024 \
      --samples 2 --quiet > "$OUT/eval_$v.log" 2>&1
    cp "/tmp/gm/$v/eval/niah.json" "$OUT/niah_$v.json" 2>/dev/null
    echo "$v done: $(grep -h '^niah' "$OUT/eval_$v.log")" ) &
done
wait
