"""Process-group facts, the collectives, and rank-0 helpers: logging, progress bars, tensorboard.

The one place that answers "which rank am I" and "should this rank print or write", and the only
module that calls torch.distributed collectives (tests/test_dist.py checks that). Works before,
during and without torch.distributed (one process).

Collectives put their tensor on the backend's device (NCCL: this rank's current CUDA device;
gloo and others: the CPU) and hand the result back on the caller's device, so code written and
tested over gloo on CPU runs unchanged over NCCL. With a process group they always communicate,
also at world size 1, so a one-GPU run takes the same path as a cluster.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

import torch
import torch.distributed as torch_dist

from shield_ds.errors import ShieldError

T = TypeVar("T")
LOGGER_NAME = "shield_ds"


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    if is_initialized():
        return torch_dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    if is_initialized():
        return torch_dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_rank0() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        torch_dist.barrier()


def device() -> torch.device:
    """The device this rank computes on: its GPU where there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def collective_device(backend: str | None = None, cuda_index: int | None = None) -> torch.device:
    """Where tensors must live for a collective of `backend` (default: the current group's)."""
    backend = backend or (torch_dist.get_backend() if is_initialized() else "gloo")
    if str(backend).lower() == "nccl":
        return torch.device("cuda", torch.cuda.current_device() if cuda_index is None else cuda_index)
    return torch.device("cpu")


_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """Reduce `tensor` over the ranks of `group` in place (op: sum, max, min); returns it.

    Identity without a process group. The tensor travels to the backend's device and back.
    """
    if not is_initialized():
        return tensor
    on = collective_device(torch_dist.get_backend(group))
    work = tensor if tensor.device == on else tensor.to(on)
    torch_dist.all_reduce(work, op=getattr(torch_dist.ReduceOp, _OPS[op]), group=group)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_gather_object(obj: T) -> list[T]:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] without a process group)."""
    if not is_initialized():
        return [obj]
    parts: list = [None] * world_size()
    torch_dist.all_gather_object(parts, obj)
    return parts


def broadcast_object(obj: T, src: int = 0) -> T:
    """Broadcast a picklable object from `src` (identity without a process group)."""
    if not is_initialized():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


@dataclass(frozen=True)
class ThreadChoice:
    """The intra-op CPU threads of this rank and why: `source` is "--cpu-threads", "OMP_NUM_THREADS",
    "cores / local ranks" (a CPU backend) or "torch default" (a GPU rank, nothing asked)."""

    threads: int
    source: str
    cores: int  # CPUs the ranks on this node may run on (the union of their affinity masks)
    local_ranks: int  # ranks on this node

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def threads_per_rank(cores: int, local_ranks: int) -> int:
    """Intra-op threads that keep `local_ranks` ranks on `cores` CPUs from oversubscribing them (at least 1)."""
    return max(1, int(cores) // max(1, int(local_ranks)))


def choose_threads(requested: int | None, environ: Mapping[str, str], node_cpus: list[set[int]],
                   on_gpu: bool, torch_default: int) -> ThreadChoice:
    """The thread choice of one rank: `requested` (the flag), else the user's OMP_NUM_THREADS, else on a CPU
    backend the node's cores over its ranks, else (GPU) torch's default. `node_cpus` holds the affinity mask
    of every rank on this node, this one included (disjoint masks, as with Slurm's --cpu-bind, add up)."""
    cores = len(set().union(*node_cpus)) if node_cpus else 1
    local = max(1, len(node_cpus))
    if requested is not None:
        if int(requested) < 1:
            raise ShieldError(f"--cpu-threads must be at least 1, not {requested}")
        return ThreadChoice(int(requested), "--cpu-threads", cores, local)
    omp = (environ.get("OMP_NUM_THREADS") or "").strip()
    if omp:
        try:
            threads = int(omp.split(",")[0])
        except ValueError:
            raise ShieldError(f"OMP_NUM_THREADS={omp!r} is not a whole number of threads") from None
        return ThreadChoice(max(1, threads), "OMP_NUM_THREADS", cores, local)
    if on_gpu:
        return ThreadChoice(torch_default, "torch default", cores, local)
    return ThreadChoice(threads_per_rank(cores, local), "cores / local ranks", cores, local)


_THREADS: ThreadChoice | None = None


def set_cpu_threads(requested: int | None = None) -> ThreadChoice:
    """Choose and set this rank's intra-op threads (`choose_threads`); log the choice once, on rank 0.

    Launchers other than torchrun (deepspeed, mpirun, srun) start every rank with as many threads as
    the machine has cores, so N ranks on a node oversubscribe it N-fold (measured: 7.7x slower
    generation with 2 ranks on 2 cores). Collective when a process group is up (every rank calls it)."""
    global _THREADS
    here = socket.gethostname()
    mine = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    node_cpus = [set(cpus) for host, cpus in all_gather_object((here, mine)) if host == here]
    choice = choose_threads(requested, os.environ, node_cpus, torch.cuda.is_available(), torch.get_num_threads())
    if choice.threads != torch.get_num_threads():
        torch.set_num_threads(choice.threads)
    if _THREADS != choice:
        get_logger("threads").info("intra-op CPU threads per rank: %d (%s; %d cores, %d ranks on this node)",
                                   choice.threads, choice.source, choice.cores, choice.local_ranks)
    _THREADS = choice
    return choice


def thread_choice() -> dict[str, Any] | None:
    """The last `set_cpu_threads` choice as recorded in the run JSON files (None when never set)."""
    return _THREADS.as_dict() if _THREADS is not None else None


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """Configure the package logger: rank 0 logs at `level`, other ranks only warnings."""
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        prefix = f"[rank{rank()}] " if world_size() > 1 else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level if is_rank0() else logging.WARNING)
    return logger


def get_logger(name: str | None = None) -> logging.Logger:
    return logging.getLogger(LOGGER_NAME if name is None else f"{LOGGER_NAME}.{name}")


def progress(iterable: Iterable[T], **kwargs) -> Iterable[T]:
    """A tqdm progress bar on rank 0; the plain iterable elsewhere."""
    if not is_rank0():
        return iterable
    from tqdm.auto import tqdm

    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("file", sys.stderr)
    return tqdm(iterable, **kwargs)


class Rank0Writer:
    """A tensorboard SummaryWriter on rank 0; a no-op on other ranks."""

    def __init__(self, log_dir: str | os.PathLike | None):
        self._writer = None
        if log_dir is not None and is_rank0():
            from torch.utils.tensorboard import SummaryWriter

            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(log_dir))

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._writer is not None:
            self._writer.add_scalar(tag, float(value), step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self._writer is not None:
            self._writer.add_text(tag, text, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
