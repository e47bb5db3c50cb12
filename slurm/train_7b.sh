#!/bin/bash
# Masked safety training of a 7B model (recipes/train.py) on one node of 8 GPUs, ZeRO-3 bf16.
#   sbatch slurm/train_7b.sh
#   MODEL=/models/llava-7b NEURONS=runs/identify-7b OUT=runs/train-7b sbatch slurm/train_7b.sh
# Ten minutes before the time limit the job saves a checkpoint and requeues itself; the restart
# resumes from it (--resume when SLURM_RESTART_COUNT > 0; RESUME=1 forces it for a fresh job).
# Env: MODEL, NEURONS (default runs/identify), OUT (default runs/train-7b), DS_CONFIG (default
# ds_configs/zero3_bf16.json), MAX_STEPS, SAVE_EVERY, EXTRA_ARGS, GPUS_PER_NODE, PYTHON, RESUME,
# DRY_RUN; see slurm/common.sh. Any #SBATCH line can be overridden on the sbatch command line.
#SBATCH --job-name=shield-train-7b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@600
set -uo pipefail
source "${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh" || exit 2
shield_train train_7b runs/train-7b
