"""The process group's lifecycle: start it however the ranks were launched, set each rank's CPU threads,
and end a rank cleanly, also on a user error (`exit_on_error`, `ToolParser`).

Floor 1: imports the ground floor (`dist`, `errors`, `io`) and the scheduler-variable mapping
(`launch.env`); everything that starts or ends a process imports this, never the engine.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import glob
import logging
import os
import sys
import typing
from datetime import timedelta
from typing import Callable, Iterator, TypeVar

import torch

from shield_ds import dist
from shield_ds.errors import ShieldError, ToolParser  # noqa: F401  (ToolParser: re-exported for the tools)
from shield_ds.launch.env import export_distributed_env, free_local_port

F = TypeVar("F", bound=Callable[..., object])
# DeepSpeed's CPU all-reduce buffer of a rank is PREFIX_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank> (its shm.cpp).
SHM_BUFFER_PREFIX = "/dev/shm/deepspeed_allreduce_buffer"


# --- distributed init ----------------------------------------------------------------------------
def init_distributed(timeout_minutes: int = 60, cpu_threads: int | None = None) -> None:
    """Start torch.distributed through DeepSpeed, whichever way the ranks were launched, and set the
    ranks' intra-op CPU threads (`dist.set_cpu_threads(cpu_threads)`).

    The deepspeed launcher and torchrun set RANK/WORLD_SIZE/...; Slurm (srun) and Open MPI
    variables are mapped by `shield_ds.launch.env`; a plain `python recipe.py` becomes a
    one-rank group on a free local port.
    """
    # deepspeed's import takes seconds and probes the accelerator: the tools that only parse flags and report
    # errors through this module must not pay it
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if dist.is_initialized():
        return
    export_distributed_env()
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": os.environ.get("MASTER_PORT", str(free_local_port()))})
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                               timeout=timedelta(minutes=timeout_minutes), verbose=False)
    atexit.register(_destroy_process_group)
    _unlink_shm_buffers()
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.local_rank() % torch.cuda.device_count())
    dist.setup_logging()
    dist.set_cpu_threads(cpu_threads)


def _destroy_process_group() -> None:
    """Tear the process group down while the interpreter is still whole.

    Registered at exit for the ranks that leave some other way than `exit_distributed` (an error's
    exit code 2, a requeue): left to interpreter finalization, gloo's threads can abort the rank.
    Local only: no collective, so it cannot hang when another rank has already failed.
    """
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            torch.distributed.destroy_process_group()


_HOSTED = False  # a recipe running inside a host process (submitit) that must get control back


@contextlib.contextmanager
def hosted_recipe() -> Iterator[None]:
    """Run a recipe in this process and return afterwards: `exit_distributed` ends the process group
    but does not exit (the host, e.g. submitit, still has to write the job's result)."""
    global _HOSTED
    saved, _HOSTED = _HOSTED, True
    try:
        yield
    finally:
        _HOSTED = saved


def exit_distributed(code: int = 0, *, together: bool = True) -> None:
    """End a rank: barrier (when `together`), destroy the process group, exit with `code`.

    The barrier keeps a rank from tearing its connections down while a peer is still in a collective;
    `os._exit` then skips the C++ static destructors of torch/gloo/DeepSpeed, where a rank could still
    abort ("terminate called without an active exception": 3 of 41 2-rank runs here with the group
    left up or destroyed at exit, 0 of 40 this way). Every output is written and closed before this
    is called. A rank that stops alone (a user error, which may be rank-local) passes
    `together=False`: no collective, so it cannot wait on a peer. Returns without exiting when no
    process group is up (a recipe that launches nothing itself) and, after the teardown, inside
    `hosted_recipe` (the caller raises SystemExit for the host then).
    """
    if not dist.is_initialized():
        return
    if together:
        dist.barrier()
    _destroy_process_group()
    if _HOSTED:
        return
    mpi = sys.modules.get("mpi4py.MPI")
    if together and mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        # mpirun counts a rank that exits without MPI_Finalize as failed; a failing rank skips it, since
        # Open MPI's finalize can wait for the peers, which may be waiting for this rank in a collective.
        mpi.Finalize()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _unlink_shm_buffers() -> None:
    """Remove the names of DeepSpeed's CPU shared-memory all-reduce buffers once every rank mapped them.

    DeepSpeed's CPU backend creates one /dev/shm buffer per rank (~70 MB, for tensor-parallel
    inference we do not use) and never unlinks it: each run would leak RAM until reboot. After a
    barrier every rank has mapped its peers' buffers, so the names can go now; the memory is freed
    when the last process exits, however it exits (kill -9 included).
    """
    from deepspeed.accelerator import get_accelerator  # as in init_distributed, which already imported it

    if get_accelerator().device_name() != "cpu" or not dist.is_initialized():
        return  # only DeepSpeed's CPU accelerator creates these buffers (never a CUDA/NCCL run)
    dist.barrier()
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    for path in glob.glob(f"{SHM_BUFFER_PREFIX}_*_{addr}_{port}_{dist.rank()}"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# --- user errors ---------------------------------------------------------------------------------
def exit_with_error(message: str) -> typing.NoReturn:
    """Print `error: MESSAGE` on stderr (one line) and exit with code 2 (ending this rank's process group
    first when one is up, `_end_distributed`)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    _end_distributed(2, together=False)
    sys.exit(2)


def exit_on_error(fn: F) -> F:
    """Decorate a recipe's main(): a ShieldError becomes `error: ...` on stderr and exit code 2; a
    distributed recipe that returns ends its ranks together (`exit_distributed`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            result = fn(*args, **kwargs)
        except ShieldError as exc:
            logging.getLogger("shield_ds").debug("user error", exc_info=True)
            exit_with_error(str(exc))
        _end_distributed(0, together=True)  # a distributed recipe's ranks end together here
        return result

    return wrapper  # type: ignore[return-value]


def _end_distributed(code: int, *, together: bool) -> None:
    """`exit_distributed` when this process started a process group (it skips the interpreter's teardown,
    where gloo's threads can abort an exiting rank); a no-op otherwise."""
    if dist.is_initialized():
        exit_distributed(code, together=together)
