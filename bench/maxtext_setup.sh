#!/usr/bin/env bash
# Build MaxText's own environment, outside this repo, for `bench/train.py --peer maxtext`.
#
#   bash bench/maxtext_setup.sh [VENV]          # default VENV: ~/maxtext-venv
#   python bench/train.py --peer maxtext --maxtext-python VENV/bin/python
#
# MaxText needs Python >= 3.12 (hybridlm's venv may be 3.11), hence a venv of its own:
# MAXTEXT_BASE_PYTHON names the interpreter (default: python3.12 on PATH). It installs
# maxtext 0.2.4 from the registry, the release of source commit e591f30 that STACK_NOTES.md
# ran (0.2.5 imports jax.experimental.xla_metadata.must_fuse_call, which needs jax >= 0.11),
# with the requirements of its "decoupled" lock (no Google Cloud clients: what
# DECOUPLE_GCLOUD=TRUE runs with), and jax/jaxlib at hybridlm's 0.10.2 so that both sides
# run the same XLA. ~10-20 minutes and ~2.5 GB (tensorflow is in the lock).
set -euo pipefail

VENV=${1:-$HOME/maxtext-venv}
BASE_PYTHON=${MAXTEXT_BASE_PYTHON:-python3.12}
MAXTEXT_VERSION=0.2.4
# Pinned against the lock's ">=" floors: jax/jaxlib as hybridlm; flax >= 0.12.9 needs
# jax >= 0.11.1, so hybridlm's 0.12.8; tokamax >= 0.0.13 imports xprof, which the
# decoupled lock leaves out (MaxText 0.2.5 pins 0.0.12 for the same reason).
PINS=(jax==0.10.2 jaxlib==0.10.2 flax==0.12.8 tokamax==0.0.12)

"$BASE_PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 12))' || {
  echo "maxtext_setup.sh: $BASE_PYTHON is $("$BASE_PYTHON" -V 2>&1); MaxText needs >= 3.12:" \
       "set MAXTEXT_BASE_PYTHON" >&2; exit 2; }
"$BASE_PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --no-deps "maxtext==$MAXTEXT_VERSION"

SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
LOCK="$SITE/dependencies/requirements/generated_requirements/decoupled-requirements.txt"
REQS="$VENV/maxtext-decoupled-requirements.txt"
names=$(printf '%s\n' "${PINS[@]}" | sed 's/==.*//' | paste -sd'|')
grep -v -E "^($names)[ <>=~;]" "$LOCK" > "$REQS"
printf '%s\n' "${PINS[@]}" >> "$REQS"
"$PY" -m pip install --quiet -r "$REQS"

# It imports on the CPU with no cloud: the trainer's module and its config.
DECOUPLE_GCLOUD=TRUE JAX_PLATFORMS=cpu "$PY" -c '
import importlib.metadata as m, jax, maxtext.trainers.pre_train.train  # noqa: F401
print("maxtext", m.version("maxtext"), "jax", jax.__version__, "flax", m.version("flax"))'
echo "ready: python bench/train.py --peer maxtext --maxtext-python $PY"
echo "   or: export HYBRIDLM_MAXTEXT_PYTHON=$PY"
