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
import sys
from pathlib import Path
from typing import Iterable, TypeVar

import torch
import torch.distributed as torch_dist

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
