#!/bin/bash
# Evaluate a model (recipes/evaluate.py): generations, judges, ASR per language x modality.
#   sbatch slurm/evaluate.sh
#   MODEL=runs/train-7b/model OUT=runs/eval-7b sbatch slurm/evaluate.sh
# Env: MODEL (default runs/train-7b/model), OUT (default runs/evaluate), EXTRA_ARGS, GPUS_PER_NODE,
# PYTHON, DRY_RUN; see slurm/common.sh. Any #SBATCH line can be overridden on the sbatch command line.
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
shield_setup evaluate runs/evaluate
MODEL=${MODEL:-runs/train-7b/model}
shield_run recipes/evaluate.py --model "$MODEL" --out "$OUT"
