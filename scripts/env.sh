# Sourced by the scripts: choose the Python environment and export PYTHON and PATH.
if [ -n "${VIRTUAL_ENV:-}" ] || [ -n "${CONDA_PREFIX:-}" ]; then
  PYTHON=${PYTHON:-python}
else
  VENV=${SHIELD_DS_VENV:-.venv}
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    python3 -m venv "$VENV"
  fi
  PYTHON="$(cd "$VENV/bin" && pwd)/python"
  export PATH="$(cd "$VENV/bin" && pwd):$PATH"
fi
export PYTHON
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TOKENIZERS_PARALLELISM=false
