#!/bin/bash
# Masked safety training of a 70B model (recipes/train.py): 8 nodes x 8 GPUs (64 ranks), ZeRO-3 bf16.
#   sbatch slurm/train_70b.sh [RECIPE FLAGS...]
#   sbatch --nodes=4 slurm/train_70b.sh --model /models/llava-72b --neurons runs/identify-72b
#   sbatch --nodes=2 slurm/train_70b.sh --model /models/llava-72b --ds-config ds_configs/zero3_offload.json   (fewer GPUs: offload)
# Scaled down to 2 CPU ranks and the tiny default model (scripts/slurm_local.sh; tests/test_slurm.py):
#   sbatch --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 --cpus-per-task=1 --time=30 slurm/train_70b.sh
#       --ds-config ds_configs/zero3_fp32.json --languages en --modalities text --per-group-limit 4
#       --benign-targets self --max-new-tokens 8 --micro-batch-size 2 --max-steps 12 --save-every 1
# (--time stays well above 10 minutes: the pre-timeout signal below comes 600 s before the limit.)
# On 64 GPUs the sharded bf16 weights, fp32 master weights and Adam moments (~16 bytes/param,
# ~1.1 TB) fit in GPU memory; below ~4 nodes use the offload config. Ten minutes before the time
# limit the job saves a checkpoint and requeues itself; the restart resumes from it.
# Arguments: recipes/train.py's flags, passed to every rank. Script default: --out runs/train-70b (none with
# --config; the recipe's own defaults, e.g. --neurons runs/identify and --ds-config
# ds_configs/zero3_bf16.json, apply to the rest). Env: LOG_DIR, GPUS_PER_NODE, PYTHON, RESUME, DRY_RUN,
# SRUN_ARGS; see slurm/common.sh.
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
shield_setup train_70b --out runs/train-70b -- "$@"
# shellcheck disable=SC2046
shield_run recipes/train.py "${ARGS[@]}" $(shield_resume_flag)
