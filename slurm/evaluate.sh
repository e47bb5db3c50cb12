#!/bin/bash
# Evaluate a model (recipes/evaluate.py): generations, judges, ASR per language x modality.
#   sbatch slurm/evaluate.sh [RECIPE FLAGS...]
#   sbatch slurm/evaluate.sh --model runs/train-7b/model --out runs/eval-7b --compare runs/eval-base
# Arguments: recipes/evaluate.py's flags (`python recipes/evaluate.py --help`), passed to every rank.
# Script defaults: --model runs/train-7b/model --out runs/evaluate (none with --config). Env: LOG_DIR,
# GPUS_PER_NODE, PYTHON, DRY_RUN, SRUN_ARGS; see slurm/common.sh. Any #SBATCH line can be overridden on the
# sbatch command line.
#SBATCH --job-name=shield-evaluate
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=08:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
set -uo pipefail
source "${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh" || exit 2
shield_setup evaluate --model runs/train-7b/model --out runs/evaluate -- "$@"
shield_run recipes/evaluate.py "${ARGS[@]}"
