#!/bin/bash
# Masked safety training of a 7B model (recipes/train.py) on one node of 8 GPUs, ZeRO-3 bf16.
#   sbatch slurm/train_7b.sh [RECIPE FLAGS...]
#   sbatch slurm/train_7b.sh --model /models/llava-7b --neurons runs/identify-7b --out runs/train-7b
# Ten minutes before the time limit the job saves a checkpoint and requeues itself; the restart
# resumes from it (--resume when SLURM_RESTART_COUNT > 0; RESUME=1 forces it for a fresh job).
# Arguments: recipes/train.py's flags (`python recipes/train.py --help`), passed to every rank. Script
# default: --out runs/train-7b (none with --config; the recipe's own defaults, e.g. --neurons runs/identify
# and --ds-config ds_configs/zero3_bf16.json, apply to the rest). Env: LOG_DIR, GPUS_PER_NODE, PYTHON,
# RESUME, DRY_RUN, SRUN_ARGS; see slurm/common.sh. Any #SBATCH line can be overridden on the sbatch command line.
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
shield_setup train_7b --out runs/train-7b -- "$@"
# shellcheck disable=SC2046
shield_run recipes/train.py "${ARGS[@]}" $(shield_resume_flag)
