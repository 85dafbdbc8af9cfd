# shellcheck shell=bash
# Sourced by the bench/gpu_*.sh scripts: the lent machine's Python environment.
# Wheels in .whl/ (if any; carried there as an ignored path) are installed first, since the
# machine may lack grain, ml_collections, or carry other flax/optax/orbax versions; then
# unbuffered output (logs survive a timeout) and the card's name, memory and driver.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
