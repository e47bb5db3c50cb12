#!/usr/bin/env bash
# The end-to-end demo on the embedded default (tiny llava checkpoint + ../shared/data), 2 CPU ranks:
# data table -> identify -> overlap analysis -> base evaluation with causal ablation -> shield
# training on 4 languages x text -> shielded evaluation on 10 languages x 2 modalities -> report.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
RANKS=${RANKS:-2}
RUN=${RUN:-runs/demo}
TRAINED_LANGUAGES=en,zh,it,vi
TRAINED_MODALITIES=text
launch() { deepspeed --num_gpus "$RANKS" --master_port "${MASTER_PORT:-29517}" "$@"; }

echo "== 0. tiny default checkpoint ($RUN/model-base) and the data"
"$PYTHON" -m shield_ds.models.tiny --arch llava --out "$RUN/model-base" >/dev/null
"$PYTHON" -m shield_ds.data.summary

echo "== 1. identify safety neurons ($RANKS ranks, ZeRO-3)"
launch recipes/identify.py --config configs/demo/identify.yaml --model "$RUN/model-base" --out "$RUN/identify" --overwrite

echo "== 2. overlap of the per-language and per-modality neuron sets"
"$PYTHON" recipes/analyze.py --neurons "$RUN/identify"

echo "== 3. evaluate the base model, with causal ablation of the safety neurons"
launch recipes/evaluate.py --config configs/demo/evaluate.yaml --model "$RUN/model-base" --out "$RUN/eval-base" \
  --ablate "$RUN/identify" --ablate-controls 2

echo "== 4. shield training (only the safety neurons change)"
launch recipes/train.py --config configs/demo/train.yaml --model "$RUN/model-base" --neurons "$RUN/identify" \
  --out "$RUN/train" --languages "$TRAINED_LANGUAGES" --modalities "$TRAINED_MODALITIES"

echo "== 5. evaluate the shielded model against the base"
launch recipes/evaluate.py --config configs/demo/evaluate.yaml --model "$RUN/train/model" --out "$RUN/eval-shielded" \
  --compare "$RUN/eval-base"

echo "== 6. report"
"$PYTHON" -m shield_ds.report --run "$RUN" --trained-languages "$TRAINED_LANGUAGES" --trained-modalities "$TRAINED_MODALITIES"
echo "tensorboard --logdir $RUN   # identify/tb and train/tb"
