"""Stop cleanly before Slurm kills the job, and come back where we left off.

The contract between the scheduler, the training loop and the sbatch scripts:

1. The job is submitted with `--requeue --signal=B:USR1@600` (slurm/train_*.sh): ten minutes before
   its time limit Slurm sends SIGUSR1 to the batch shell, which forwards it to `srun`, which
   forwards it to every rank. Preemption and `scancel` send SIGTERM to every rank directly.
   Under submitit the pre-timeout signal is submitit's (SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL).
2. Each rank creates `PreemptionHandler()` (it installs handlers for those signals that only set a
   flag) and calls `should_stop()` once per step. should_stop() all-reduces the flag (MAX), so all
   ranks see the same answer at the same step even when the signal reached them at different times.
3. When it returns True the loop saves a DeepSpeed checkpoint (a collective: all ranks take part),
   waits at a barrier, destroys the process group (exiting with it alive can abort the process and
   lose the exit code), and every rank exits with `REQUEUE_EXIT_CODE`.
4. Before that barrier rank 0 calls `mark_for_requeue()`, which writes the file named by
   $SHIELD_REQUEUE_MARKER (set by slurm/common.sh). The sbatch script runs srun with
   --kill-on-bad-exit=1, so that a crashed rank takes its peers down at once instead of leaving
   them in a collective until the communication timeout; but then the first rank to exit with code
   3 also makes srun kill the others, and srun's exit code is theirs (143). The marker is what
   the script trusts. It sees the marker (or the exit code) and runs `scontrol requeue $SLURM_JOB_ID`;
   Slurm starts the same job again with SLURM_RESTART_COUNT incremented, and the script adds
   `--resume`, so train.py loads the latest checkpoint. (Under submitit, shield_ds.launch.submit
   does the requeue through submitit's checkpoint() instead.) A process started some other way
   inside Slurm can call `requeue_self()` itself.

After a SIGTERM Slurm waits KillWait (often 30 s) and then sends SIGKILL, so SIGTERM is a last
chance: the periodic `--save-every` checkpoints are what survive a hard preemption.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType

import torch

from shield_ds import dist
from shield_ds.dist import get_logger
from shield_ds.io import atomic_path

REQUEUE_EXIT_CODE = 3
REQUEUE_MARKER_ENV = "SHIELD_REQUEUE_MARKER"

log = get_logger("launch")


def restart_count() -> int:
    """How many times Slurm has restarted this job (0 outside Slurm or on the first run)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def default_signals() -> tuple[signal.Signals, ...]:
    """SIGUSR1 (the sbatch pre-timeout signal), SIGTERM (preemption, scancel), and submitit's signal
    when this process runs under submitit."""
    signals = [signal.SIGUSR1, signal.SIGTERM]
    if os.environ.get("SUBMITIT_EXECUTOR"):
        submitit_signal = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
        if submitit_signal is not None and submitit_signal not in signals:
            signals.append(submitit_signal)
    return tuple(signals)


class PreemptionHandler:
    """Turn the pre-timeout and preemption signals into a flag that all ranks agree on.

    Install from the main thread (Python only delivers signals there). Usable as a context manager,
    which restores the previous handlers on exit.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] | None = None, install: bool = True):
        self.signals = tuple(signals) if signals is not None else default_signals()
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}
        if install:
            self.install()

    def install(self) -> "PreemptionHandler":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler must be installed from the main thread")
        for signum in self.signals:
            if signum not in self._previous:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]
        self._previous.clear()

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only set the flag here: the training loop decides when it is safe to stop.
        if self.received is None:
            self.received = signal.Signals(signum)
            log.warning("received %s: will save and stop at the next step", self.received.name)

    def request_stop(self) -> None:
        """Ask for a stop from code (as if a signal had arrived on this rank)."""
        if self.received is None:
            self.received = signal.SIGUSR1

    def stop_requested_locally(self) -> bool:
        return self.received is not None

    def should_stop(self) -> bool:
        """True on every rank once any rank got a signal (a collective: call it on all ranks each step)."""
        local = self.received is not None
        if not dist.is_initialized():
            return local
        flag = torch.tensor([1 if local else 0], dtype=torch.int32)
        return bool(dist.all_reduce(flag, op="max").item())


def mark_for_requeue(reason: str = "preempted") -> bool:
    """Write the requeue marker ($SHIELD_REQUEUE_MARKER) for the sbatch script; False when none is asked for.

    Call on rank 0 once the checkpoint is complete and before the barrier that precedes the exit,
    so the marker exists before any rank exits (and srun --kill-on-bad-exit kills the rest).
    """
    path = os.environ.get(REQUEUE_MARKER_ENV)
    if not path:
        return False

    with atomic_path(path) as tmp:
        Path(tmp).write_text(reason + "\n", encoding="utf-8")
    return True


def requeue_self(job_id: str | None = None) -> bool:
    """Run `scontrol requeue JOB` for this Slurm job; False (and nothing done) outside Slurm.

    Slurm then kills the running job and starts it again later with SLURM_RESTART_COUNT + 1.
    Call it from one process only (rank 0), after the checkpoint is complete.
    """
    if job_id is None:
        job_id = os.environ.get("SLURM_JOB_ID")  # an array task has its own job id too
    scontrol = shutil.which("scontrol")
    if not job_id or scontrol is None:
        log.warning("not inside a Slurm job: nothing to requeue")
        return False
    proc = subprocess.run([scontrol, "requeue", job_id], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job_id, proc.stderr.strip())
        return False
    log.warning("requeued Slurm job %s", job_id)
    return True
