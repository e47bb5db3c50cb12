#!/usr/bin/env bash
# The end-to-end demo on the embedded default (tiny llava checkpoint + ../shared/data), 2 CPU ranks:
# data table -> identify (all languages) -> overlap analysis -> the experiment (base evaluation with
# causal ablation; safety-neuron, random-neuron, LoRA and full-FFN arms trained on 4 languages x
# text; each evaluated on held-out test prompts of 10 languages x 2 modalities) -> report.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
RANKS=${RANKS:-2}
RUN=${RUN:-runs/demo}
TRAINED_LANGUAGES=en,zh,it,vi
launch() { deepspeed --num_gpus "$RANKS" --master_port "${MASTER_PORT:-29517}" "$@"; }

echo "== 0. tiny default checkpoint ($RUN/model-base) and the data"
"$PYTHON" -m shield_ds.models.tiny --arch llava --out "$RUN/model-base" >/dev/null
"$PYTHON" -m shield_ds.data.summary

echo "== 1. identify safety neurons on all ten languages x {text, typographic} (train split, $RANKS ranks, ZeRO-3)"
launch recipes/identify.py --config configs/demo/identify.yaml --model "$RUN/model-base" --out "$RUN/identify" --overwrite

echo "== 2. overlap of the per-language and per-modality neuron sets"
"$PYTHON" recipes/analyze.py --neurons "$RUN/identify"

echo "== 3. the experiment: base (with causal ablation), safety neurons, random neurons x 3, LoRA, full FFN;"
echo "==    trained on $TRAINED_LANGUAGES x text, evaluated on the test split of every language x {text, typographic}"
"$PYTHON" recipes/experiment.py --config configs/experiment.yaml --model "$RUN/model-base" --out "$RUN/experiment" \
  --launcher "deepspeed --num_gpus $RANKS --master_port ${MASTER_PORT:-29517}" --train-languages "$TRAINED_LANGUAGES" \
  --base-evaluate-args "--ablate $RUN/identify --ablate-controls 2"

echo "== 4. report"
"$PYTHON" -m shield_ds.report --run "$RUN"
echo "tensorboard --logdir $RUN   # identify/tb and experiment/arms/*/train/tb"
