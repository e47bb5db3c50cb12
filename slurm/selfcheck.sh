#!/bin/bash
# Check a cluster's wiring: every rank joins the process group, one all-reduce, a summary line.
#   sbatch slurm/selfcheck.sh [SELFCHECK FLAGS...]                     (2 nodes x 8 GPUs)
#   sbatch --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 slurm/selfcheck.sh      (CPU ranks)
# Check the requeue path too: sbatch slurm/selfcheck.sh --wait-for-preemption 600,
# then `scancel --batch --signal=USR1 JOBID` (what --signal=B:USR1@60 sends before the time
# limit); the job exits with the requeue code, comes back with --resume, and finishes.
# Arguments: recipes/selfcheck.py's flags (--out, --size, --wait-for-preemption). Script default: --out
# runs/selfcheck. Env: LOG_DIR, GPUS_PER_NODE, PYTHON, RESUME, DRY_RUN, SRUN_ARGS; see slurm/common.sh.
#SBATCH --job-name=shield-selfcheck
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=4
#SBATCH --time=00:15:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@60
set -uo pipefail
source "${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh" || exit 2
shield_setup selfcheck --out runs/selfcheck -- "$@"
# shellcheck disable=SC2046
shield_run recipes/selfcheck.py "${ARGS[@]}" $(shield_resume_flag)
