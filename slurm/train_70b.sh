#!/bin/bash
# Masked safety training of a 70B model (recipes/train.py): 8 nodes x 8 GPUs (64 ranks), ZeRO-3 bf16.
#   sbatch slurm/train_70b.sh
#   MODEL=/models/llava-72b NEURONS=runs/identify-72b sbatch --nodes=4 slurm/train_70b.sh
#   DS_CONFIG=ds_configs/zero3_offload.json sbatch --nodes=2 slurm/train_70b.sh   (fewer GPUs: offload)
# Scaled down to 2 CPU ranks and the tiny default model (scripts/slurm_local.sh; tests/test_slurm.py):
#   DS_CONFIG=ds_configs/zero3_fp32.json EXTRA_ARGS="--languages en --modalities text --per-group-limit 4
#       --benign-targets self --max-new-tokens 8 --micro-batch-size 2 --max-steps 12 --save-every 1"
#       sbatch --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 --cpus-per-task=1 --time=30 slurm/train_70b.sh
# (--time stays well above 10 minutes: the pre-timeout signal below comes 600 s before the limit.)
# On 64 GPUs the sharded bf16 weights, fp32 master weights and Adam moments (~16 bytes/param,
# ~1.1 TB) fit in GPU memory; below ~4 nodes use the offload config. Ten minutes before the time
# limit the job saves a checkpoint and requeues itself; the restart resumes from it.
# Env: MODEL, NEURONS (default runs/identify), OUT (default runs/train-70b), DS_CONFIG, MAX_STEPS,
# SAVE_EVERY, EXTRA_ARGS, GPUS_PER_NODE, PYTHON, RESUME, DRY_RUN; see slurm/common.sh.
#SBATCH --job-name=shield-train-70b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@600
set -uo pipefail
source "${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh" || exit 2
shield_train train_70b runs/train-70b
