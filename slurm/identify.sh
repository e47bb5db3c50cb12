#!/bin/bash
# Identify safety neurons (recipes/identify.py) on one node of 8 GPUs, ZeRO-3 inference.
#   sbatch slurm/identify.sh [RECIPE FLAGS...]
#   sbatch slurm/identify.sh --model /models/llava-7b --harmful multijail --harmful figstep --out runs/identify-7b
#   sbatch slurm/identify.sh --config configs/x.yaml --out runs/identify-7b
# Arguments: recipes/identify.py's flags (`python recipes/identify.py --help`), passed to every rank.
# Script default: --out runs/identify (none with --config; the recipe's own defaults, e.g. --ds-config
# ds_configs/zero3_infer.json, apply to the rest). Env: LOG_DIR, GPUS_PER_NODE, PYTHON, DRY_RUN, SRUN_ARGS;
# see slurm/common.sh. Any #SBATCH line can be overridden on the sbatch command line.
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
shield_setup identify --out runs/identify -- "$@"
# Identification restarts from scratch after a requeue: it has no checkpoints to resume from.
shield_run recipes/identify.py "${ARGS[@]}"
