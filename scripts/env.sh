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
# DeepSpeed JIT-builds its CPU comm op on first use; a cache per environment stops checkouts with
# different virtualenvs from rebuilding it for each other (every rank waits on the build lock).
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$("$PYTHON" -c 'import sys; print(sys.prefix)')/torch_extensions}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TOKENIZERS_PARALLELISM=false
