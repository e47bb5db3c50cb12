# Shared body of the sbatch scripts in slurm/ (sourced, not submitted).
#
# Launch model: one Slurm task per GPU. `srun` starts NODES x GPUS_PER_NODE copies of
# `python recipes/X.py`; each rank maps SLURM_PROCID/SLURM_LOCALID/SLURM_STEP_NUM_TASKS to
# RANK/LOCAL_RANK/WORLD_SIZE and takes MASTER_ADDR (first host of the step) and MASTER_PORT (from the
# job id) in shield_ds.launch.env. No ssh, no hostfile, no launcher process between Slurm and the
# ranks: srun forwards signals straight to the ranks and returns their highest exit code.
#
# Arguments: the recipe's own flags (`--config FILE.yaml` and any option), passed on to every rank; the
# recipe's parser is the only place that declares and checks them. A script's defaults go before them
# (argparse keeps the last of a repeated flag, so the user's win), and none are passed with --config: they
# would override the file's values (flags beat YAML). Keep script defaults to scalar options: a repeated
# list option (--harmful a --harmful b) adds up instead of replacing.
#
# Environment (Slurm-level knobs only): LOG_DIR, GPUS_PER_NODE (ranks per node, default the job's
# --ntasks-per-node), PYTHON (default .venv/bin/python of the repo if present, else python), RESUME (auto:
# add --resume when Slurm restarted the job; 1: always; 0: never), DRY_RUN=1 (print the srun command and
# exit), SRUN_ARGS (see Crashes), REPO (default: the directory sbatch was called from).
#
# Logs: everything the job prints goes to $LOG_DIR/<job name>-<job id>.log (appended across
# restarts) as well as to Slurm's --output file. LOG_DIR defaults to the logs/ directory beside the run's
# --out (runs/logs for --out runs/identify), not inside it: identify and evaluate write OUT as a whole
# (they refuse an OUT they did not write and replace it atomically at the end). The script reads --out from
# the arguments (`--out X` or `--out=X`, the last one); an `out:` in a --config file is not visible to it, so
# then LOG_DIR defaults beside the script's default out: pass --out as a flag or set LOG_DIR.
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

# shield_setup NAME DEFAULT_ARGS... -- USER_ARGS...: go to the repo, set ARGS (the recipe's arguments: the
# script's defaults, none with --config, then the user's) and OUT (their --out), start the log.
shield_setup() {
    local name=$1 defaults=() arg retired=() var
    shift
    while (($#)) && [[ $1 != -- ]]; do defaults+=("$1"); shift; done
    shift
    ARGS=("${defaults[@]}" "$@")
    for arg in "$@"; do
        if [[ $arg == --config || $arg == --config=* ]]; then ARGS=("$@"); fi
    done
    for var in OUT MODEL NEURONS MAX_STEPS SAVE_EVERY HARMFUL BENIGN BATCH_SIZE DS_CONFIG EXTRA_ARGS; do
        if [[ -n ${!var:-} ]]; then retired+=("$var"); fi
    done
    OUT=$(shield_last_out "${ARGS[@]}")  # empty when a --config file decides it
    REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
    cd "$REPO" || shield_die "cannot cd to $REPO"
    [[ -f recipes/selfcheck.py && -d shield_ds ]] ||
        shield_die "$REPO is not the shield-ds repository: submit from the repo root (sbatch slurm/$name.sh) or set REPO"
    LOG_DIR=${LOG_DIR:-$(dirname "${OUT:-$(shield_last_out "${defaults[@]}")}")/logs}
    mkdir -p "$LOG_DIR"
    SHIELD_LOG=$LOG_DIR/${SLURM_JOB_NAME:-$name}-${SLURM_JOB_ID:-local}.log
    exec > >(tee -a "$SHIELD_LOG") 2>&1
    if ((${#retired[@]})); then
        echo "=== warning: ${retired[*]} set but not read: the recipe's options are arguments now" \
             "(sbatch slurm/$name.sh --model M --out DIR ...)"
    fi
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
         "$NNODES node(s) x $GPUS_PER_NODE rank(s); out ${OUT:-(from --config)}; log $SHIELD_LOG"
}

# shield_last_out ARGS...: the value of the last --out in ARGS (`--out X` or `--out=X`), as argparse takes it.
shield_last_out() {
    local out=
    while (($#)); do
        case $1 in
            --out) (($# > 1)) && out=$2 && shift ;;
            --out=*) out=${1#--out=} ;;
        esac
        shift
    done
    echo "$out"
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
    # SRUN_ARGS is split on whitespace on purpose: it may hold several srun options.
    # shellcheck disable=SC2206
    local cmd=(srun --nodes="$NNODES" --ntasks-per-node="$GPUS_PER_NODE" --ntasks=$((NNODES * GPUS_PER_NODE))
               ${SRUN_ARGS---kill-on-bad-exit=1} "$PYTHON" -u "$recipe" "$@")
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
