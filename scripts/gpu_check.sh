#!/usr/bin/env bash
# The prepared GPU check (issue 13): tiny llava and llama through identify -> train (mask, delta;
# bf16) -> evaluate over NCCL at world size 1, kill -9 + --resume bit-identical, and
# benchmarks/gpu_7b.py; one summary table (stage | result | seconds | detail), exit 1 if a row failed.
# The driver is scripts/gpu_check.py (its docstring lists the stages).
#
#   bash scripts/gpu_check.sh [--report DIR]     # one NVIDIA H100/H200, no network, under 8 minutes
#   bash scripts/gpu_check.sh --dry-run          # the same steps on the CPU (gloo), tiny sizes (CI)
#
# The GPU machine has python3 with torch, transformers, peft, accelerate, tensorboard and mpi4py,
# but no deepspeed (nor datasets or submitit, which this check does not need): when deepspeed is
# not importable, it is installed from the wheels in dist/gpu-wheels, built beforehand on a CPU
# machine with network by `bash scripts/build_gpu_wheels.sh` (git-ignored, under 64 MiB). The
# project itself is used from this checkout through PYTHONPATH (nothing to install).
#
# The lead's invocation through the device tool (after build_gpu_wheels.sh, from the repo root):
#   run(command="bash scripts/gpu_check.sh --report $OUT", carry=["dist/gpu-wheels"], timeout_s=600)
# $OUT then holds summary.md (the table), gpu_7b.json and gpu_7b.log (for benchmarks/RESULTS.md)
# and failures.log (log tails of failed stages, if any).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=dist/gpu-wheels

# Python: $PYTHON if set; the project's virtualenv where there is one (the CPU machines); else python3.
if [ -z "${PYTHON:-}" ]; then
  if [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] || [ -x "${SHIELD_DS_VENV:-.venv}/bin/python" ]; then
    source scripts/env.sh
  else
    PYTHON=python3
  fi
fi

if ! "$PYTHON" -c "import deepspeed" >/dev/null 2>&1; then
  if ! ls "$WHEELS"/deepspeed-*.whl >/dev/null 2>&1; then
    echo "error: deepspeed is not importable and $WHEELS has no deepspeed wheel (run bash scripts/build_gpu_wheels.sh on a machine with network and carry $WHEELS)" >&2
    exit 2
  fi
  # Every distribution in the folder by name, without dependency resolution (the machine's torch, numpy,
  # ... stay as they are): pip skips the names already installed and picks the wheel of this Python.
  NAMES=$(ls "$WHEELS"/*.whl | sed -E 's#.*/##; s#-.*##' | sort -u | tr '\n' ' ')
  echo "[gpu_check] installing from $WHEELS where missing: $NAMES" >&2
  "$PYTHON" -m pip install -q --disable-pip-version-check --no-index --no-deps --find-links "$WHEELS" $NAMES \
    && "$PYTHON" -c "import deepspeed" || { echo "error: installing deepspeed from $WHEELS failed" >&2; exit 2; }
fi

exec "$PYTHON" scripts/gpu_check.py "$@"
