#!/usr/bin/env bash
# The paper in miniature at GPU scale, one script: the paper_mini sweep (warm stage of repeats,
# then needles at the training length, then the context-extension stage), 3 seeds of rope and
# rnope_swa, two chains side by side on one GPU, then the report. Untested on a GPU so far.
#   ARGS=size=small,seq_len=1024,window=128,steps=4000,warm_steps=3000,ext_steps=500 \
#       bash bench/gpu_mini.sh
set -u
OUT=${OUT:-/tmp/gpu_mini}; mkdir -p "$OUT"
ARGS=${ARGS:-size=small,seq_len=1024,window=128,seeds=3,steps=4000,batch=16,warm_steps=3000,ext_steps=500}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
python3 -m hybridlm.cli sweep --sweep "configs/experiments/paper_mini.py:$ARGS" \
  --launcher local --jobs 2 --root "$OUT/runs" > "$OUT/sweep.log" 2>&1
python3 -m hybridlm.cli sweep --sweep "configs/experiments/paper_mini.py:$ARGS" \
  --root "$OUT/runs" --summarize --report "$OUT/experiments.md" >> "$OUT/sweep.log" 2>&1
tail -3 "$OUT/sweep.log"
