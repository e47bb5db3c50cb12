#!/usr/bin/env bash
# The end-to-end demo on the embedded default: tiny llava checkpoint + ../shared/data, 2 CPU ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
RANKS=${RANKS:-2}
OUT=${OUT:-runs/demo}
LAUNCH=(deepspeed --num_gpus "$RANKS" --master_port "${MASTER_PORT:-29517}")

echo "== 0. tiny default checkpoint and data"
"$PYTHON" -m shield_ds.models.tiny --arch llava --out "$OUT/model-base" >/dev/null
"$PYTHON" -m shield_ds.data.summary

echo "== 1. identify safety neurons ($RANKS ranks, ZeRO-3)"
"${LAUNCH[@]}" recipes/identify.py --config configs/demo/identify.yaml --model "$OUT/model-base" --out "$OUT/identify" --overwrite
