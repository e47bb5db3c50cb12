#!/usr/bin/env bash
# Build the wheels that scripts/gpu_check.sh installs on a GPU machine without network.
#
#   bash scripts/build_gpu_wheels.sh          # on a CPU machine with PyPI; writes dist/gpu-wheels/ (git-ignored)
#
# The GPU machine (issue 13) has python3 (3.12) with torch, transformers, peft, accelerate,
# tensorboard, mpi4py, numpy, psutil, msgpack, ninja, py-cpuinfo, einops, cloudpickle, ... but no
# deepspeed. Versions are the ones installed in this project's environment:
# - deepspeed: its source distribution built into a pure-Python wheel with DS_BUILD_OPS=0 (no
#   prebuilt ops; fused Adam is JIT-built there with its nvcc and ninja);
# - deepspeed's requirements a torch + transformers machine may lack: hjson, pydantic (+ pydantic-core,
#   compiled: one wheel per Python version in GPU_PYTHON_VERSIONS, annotated-types, typing-inspection),
#   and for safety py-cpuinfo, einops, msgpack, ninja and psutil (pip installs only what is missing);
# - submitit (+ cloudpickle), for recipes/submit.py on a GPU cluster.
# Not datasets: shield_ds imports it only for hub datasets and save_to_disk directories (lazily),
# never on the identify/train/evaluate path of local files, so the GPU machine needs no pyarrow for it.
# The project itself travels as source (PYTHONPATH), not as a wheel. Total must stay under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=dist/gpu-wheels
PY_VERSIONS=${GPU_PYTHON_VERSIONS:-"3.10 3.11 3.12 3.13"}
LIMIT_MIB=64
source scripts/env.sh   # PYTHON: the project's environment (its versions are the ones shipped)

version() { "$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
pip_q() { "$PYTHON" -m pip -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

rm -rf "$OUT"
mkdir -p "$OUT"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

DS=$(version deepspeed)
echo "[wheels] deepspeed $DS: source distribution -> pure-Python wheel (DS_BUILD_OPS=0)"
pip_q download --no-deps --no-binary :all: -d "$TMP" "deepspeed==$DS"
# No build isolation: deepspeed's setup.py imports torch, which is already here (and large).
DS_BUILD_OPS=0 pip_q wheel --no-deps --no-build-isolation -w "$OUT" "$TMP"/deepspeed-*.tar.gz
ls "$OUT"/deepspeed-*-py3-none-any.whl >/dev/null   # pure Python, any interpreter

PURE=""
for name in hjson pydantic annotated-types typing-inspection py-cpuinfo einops submitit cloudpickle; do
  PURE="$PURE $name==$(version "$name")"
done
echo "[wheels] pure-Python:$PURE"
pip_q download --no-deps --only-binary :all: -d "$OUT" $PURE

COMPILED=""
for name in pydantic-core msgpack ninja psutil; do
  COMPILED="$COMPILED $name==$(version "$name")"
done
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
for py in $PY_VERSIONS; do
  echo "[wheels] compiled for CPython $py (x86_64):$COMPILED"
  pip_q download --no-deps --only-binary :all: --implementation cp --python-version "$py" $PLATFORMS \
    -d "$OUT" $COMPILED
done

ls -1 "$OUT"
BYTES=$(du -cb "$OUT"/*.whl | tail -1 | cut -f1)
MIB=$(awk -v b="$BYTES" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "[wheels] $(ls "$OUT" | wc -l) wheels in $OUT: $MIB MiB in all (limit $LIMIT_MIB MiB)"
if [ "$BYTES" -ge $((LIMIT_MIB * 1048576)) ]; then
  echo "error: $OUT is $MIB MiB, over the $LIMIT_MIB MiB that travel with the working tree" >&2
  exit 1
fi
