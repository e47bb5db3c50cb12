#!/bin/bash
# Identify safety neurons (recipes/identify.py) on one node of 8 GPUs, ZeRO-3 inference.
#   sbatch slurm/identify.sh
#   MODEL=/models/llava-7b HARMFUL="multijail figstep" BENIGN="alpaca" OUT=runs/identify-7b sbatch slurm/identify.sh
# Env: MODEL, HARMFUL / BENIGN (space-separated dataset specs), OUT (default runs/identify),
# DS_CONFIG (default ds_configs/zero3_infer.json: inference only, no optimizer), BATCH_SIZE, EXTRA_ARGS, GPUS_PER_NODE, PYTHON,
# DRY_RUN; see slurm/common.sh. Any #SBATCH line can be overridden on the sbatch command line.
#SBATCH --job-name=shield-identify
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=06:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
set -uo pipefail
source "${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh" || exit 2
shield_setup identify runs/identify
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3_infer.json}
args=(--out "$OUT" --ds-config "$DS_CONFIG")
[[ -n ${MODEL:-} ]] && args+=(--model "$MODEL")
# shellcheck disable=SC2206
[[ -n ${HARMFUL:-} ]] && args+=(--harmful $HARMFUL)
# shellcheck disable=SC2206
[[ -n ${BENIGN:-} ]] && args+=(--benign $BENIGN)
[[ -n ${BATCH_SIZE:-} ]] && args+=(--batch-size "$BATCH_SIZE")
# Identification restarts from scratch after a requeue: it has no checkpoints to resume from.
shield_run recipes/identify.py "${args[@]}"
