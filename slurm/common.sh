# Shared body of the sbatch scripts in slurm/ (sourced, not submitted).
#
# Launch model: one Slurm task per GPU. `srun` starts NODES x GPUS_PER_NODE copies of
# `python recipes/X.py`; each rank maps SLURM_PROCID/SLURM_LOCALID/SLURM_STEP_NUM_TASKS to
# RANK/LOCAL_RANK/WORLD_SIZE and takes MASTER_ADDR (first host of the step) and MASTER_PORT (from the
# job id) in shield_ds.launch.env. No ssh, no hostfile, no launcher process between Slurm and the
# ranks: srun forwards signals straight to the ranks and returns their highest exit code.
#
# Environment overrides (every script): OUT, LOG_DIR, EXTRA_ARGS, GPUS_PER_NODE (ranks per node, default the
# job's --ntasks-per-node), PYTHON (default .venv/bin/python of the repo if present, else python),
# RESUME (auto: add --resume when Slurm restarted the job; 1: always; 0: never), DRY_RUN=1 (print
# the srun command and exit), REPO (default: the directory sbatch was called from).
#
# Logs: everything the job prints goes to $LOG_DIR/<job name>-<job id>.log (appended across
# restarts) as well as to Slurm's --output file. LOG_DIR defaults to the logs/ directory beside OUT
# (runs/logs for OUT=runs/identify), not inside it: identify and evaluate write OUT as a whole
# (they refuse an OUT they did not write and replace it atomically at the end).
#
# Requeue: ranks that stop for preemption save a checkpoint, rank 0 writes the marker file
# $SHIELD_REQUEUE_MARKER, and they exit with REQUEUE_EXIT_CODE (3, see shield_ds/launch/preemption.py);
# the script then runs `scontrol requeue` and Slurm starts the job again with SLURM_RESTART_COUNT + 1,
# which adds --resume.
#
# Crashes: srun runs with --kill-on-bad-exit=1 (SRUN_ARGS; set SRUN_ARGS="" to turn it off), so a
# rank that dies (OOM, kill -9, an exception) takes the others down at once instead of leaving them
# in a collective until the communication timeout. The price: the first rank to exit with code 3
# makes srun kill the rest, and srun then returns their 143; the marker, written before any rank
# exits, is what decides the requeue.

REQUEUE_EXIT_CODE=3

shield_die() { echo "error: $*" >&2; exit 2; }

# shield_setup NAME DEFAULT_OUT: go to the repo, create the run directory, start the log.
shield_setup() {
    local name=$1 default_out=$2
    REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
    cd "$REPO" || shield_die "cannot cd to $REPO"
    [[ -f recipes/selfcheck.py && -d shield_ds ]] ||
        shield_die "$REPO is not the shield-ds repository: submit from the repo root (sbatch slurm/$name.sh) or set REPO"
    OUT=${OUT:-$default_out}
    LOG_DIR=${LOG_DIR:-$(dirname "$OUT")/logs}
    mkdir -p "$LOG_DIR"
    SHIELD_LOG=$LOG_DIR/${SLURM_JOB_NAME:-$name}-${SLURM_JOB_ID:-local}.log
    exec > >(tee -a "$SHIELD_LOG") 2>&1
    if [[ -z ${PYTHON:-} ]]; then
        if [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python; fi
    fi
    NNODES=${SLURM_JOB_NUM_NODES:-1}
    local per_node=${SLURM_NTASKS_PER_NODE:-}
    per_node=${per_node%%(*}  # "8(x2)" -> "8"
    if [[ -z $per_node && -n ${SLURM_NTASKS:-} ]]; then per_node=$((SLURM_NTASKS / NNODES)); fi
    GPUS_PER_NODE=${GPUS_PER_NODE:-${per_node:-1}}
    RESTARTS=${SLURM_RESTART_COUNT:-0}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    echo "=== $(date -Is) job ${SLURM_JOB_ID:-none} ($name) restart $RESTARTS on ${SLURM_JOB_NODELIST:-$(hostname)}:" \
         "$NNODES node(s) x $GPUS_PER_NODE rank(s); out $OUT; log $SHIELD_LOG"
}

# shield_resume_flag: "--resume" when this run should resume (see RESUME above).
shield_resume_flag() {
    case "${RESUME:-auto}" in
        1|yes|always) echo --resume ;;
        0|no|never) ;;
        auto) ((RESTARTS > 0)) && echo --resume ;;
        *) shield_die "RESUME must be auto, 1 or 0 (got $RESUME)" ;;
    esac
    return 0
}

_shield_forward() {  # forward a signal from the batch shell to srun, which passes it to every rank
    echo "=== $(date -Is) batch shell got SIG$1: forwarding to the ranks"
    [[ -n ${SHIELD_SRUN_PID:-} ]] && kill -s "$1" "$SHIELD_SRUN_PID" 2>/dev/null
    return 0
}

# shield_run RECIPE ARGS...: start one rank per GPU on every node, wait, requeue on REQUEUE_EXIT_CODE.
shield_run() {
    local recipe=$1; shift
    # EXTRA_ARGS is split on whitespace on purpose: it holds several flags.
    # shellcheck disable=SC2206
    local cmd=(srun --nodes="$NNODES" --ntasks-per-node="$GPUS_PER_NODE" --ntasks=$((NNODES * GPUS_PER_NODE))
               ${SRUN_ARGS---kill-on-bad-exit=1} "$PYTHON" -u "$recipe" "$@" ${EXTRA_ARGS:-})
    echo "=== command: ${cmd[*]}"
    if [[ ${DRY_RUN:-0} == 1 ]]; then return 0; fi
    [[ -n ${SLURM_JOB_ID:-} ]] || shield_die "not inside a Slurm job: submit this script with sbatch"
    export SHIELD_REQUEUE_MARKER=$LOG_DIR/.requeue-$SLURM_JOB_ID-$RESTARTS
    rm -f "$SHIELD_REQUEUE_MARKER"
    # srun runs in the background so the traps run as soon as a signal arrives (bash defers traps
    # while a foreground command runs); `wait` returns early on each trapped signal.
    trap '_shield_forward USR1' USR1
    trap '_shield_forward TERM' TERM
    "${cmd[@]}" &
    SHIELD_SRUN_PID=$!
    local rc
    while kill -0 "$SHIELD_SRUN_PID" 2>/dev/null; do
        wait "$SHIELD_SRUN_PID"
    done
    wait "$SHIELD_SRUN_PID"  # the exit status bash kept for it, whichever wait reaped it
    rc=$?
    trap - USR1 TERM
    echo "=== $(date -Is) ranks exited with code $rc"
    if ((rc == REQUEUE_EXIT_CODE)) || [[ -f $SHIELD_REQUEUE_MARKER ]]; then
        rm -f "$SHIELD_REQUEUE_MARKER"
        echo "=== ranks stopped for preemption (checkpoint saved): requeueing job $SLURM_JOB_ID (restart $((RESTARTS + 1)) will resume)"
        scontrol requeue "$SLURM_JOB_ID" || { echo "=== scontrol requeue failed"; exit 1; }
        # Slurm now ends this run; leave it a moment to do so rather than exiting first.
        sleep 60
        exit 0
    fi
    return "$rc"
}

# shield_train NAME DEFAULT_OUT: the whole body of the train_*.sh scripts (they differ in #SBATCH lines only).
shield_train() {
    shield_setup "$1" "$2"
    DS_CONFIG=${DS_CONFIG:-ds_configs/zero3_bf16.json}
    NEURONS=${NEURONS:-runs/identify}
    local args=(--neurons "$NEURONS" --out "$OUT" --ds-config "$DS_CONFIG")
    [[ -n ${MODEL:-} ]] && args+=(--model "$MODEL")
    [[ -n ${MAX_STEPS:-} ]] && args+=(--max-steps "$MAX_STEPS")
    [[ -n ${SAVE_EVERY:-} ]] && args+=(--save-every "$SAVE_EVERY")
    # shellcheck disable=SC2046
    shield_run recipes/train.py "${args[@]}" $(shield_resume_flag)
}
