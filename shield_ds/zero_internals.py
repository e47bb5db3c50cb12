"""Every read or write of DeepSpeed state that is not public API, in one place.

Masked training and the memory accounting rely on fields of ZeRO-3's parameters and of its stage-3
optimizer (`DeepSpeedZeroOptimizer_Stage3`) that DeepSpeed does not document as API and may move in
any release. Nothing else in shield-ds touches them: it calls the functions here. They were written
against the range pinned in pyproject.toml (deepspeed >=0.19,<0.20); `tests/test_zero_internals.py`
builds a real ZeRO-3 engine and checks each field below, so a DeepSpeed that moved one fails there
first, with the version and the field named.

Parameters (set by `deepspeed.zero.Init` on a partitioned parameter):
    ds_id, ds_numel, ds_shape, ds_tensor (the local partition; its ds_numel), ds_persist,
    ds_process_group
Stage-3 optimizer (`engine.optimizer`):
    optimizer (the basic torch optimizer), backup_optimizer (optional), fp16_groups,
    fp32_partitioned_groups_flat, grad_position, get_param_id(), loss_scale, step (replaced while
    a GradientMasker is installed)
Local gradient partitions: `deepspeed.utils.safe_get_local_grad` / `safe_set_local_grad`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

# --- parameters ------------------------------------------------------------------------------


def is_partitioned(param: torch.Tensor) -> bool:
    """Whether `param` is a ZeRO-3 parameter (created under zero.Init)."""
    return hasattr(param, "ds_id") and hasattr(param, "ds_numel")


def full_shape(param: torch.Tensor) -> torch.Size:
    """The full (unpartitioned) shape of a parameter, ZeRO-3 or plain."""
    return torch.Size(param.ds_shape) if is_partitioned(param) else param.shape


def full_numel(param: torch.Tensor) -> int:
    """The full element count of a parameter, ZeRO-3 or plain."""
    return int(param.ds_numel) if is_partitioned(param) else param.numel()


def partition_numel(param: torch.Tensor) -> int | None:
    """Elements of this rank's partition of a ZeRO-3 parameter (padding included); None when unknown."""
    partition = getattr(param, "ds_tensor", None)
    return int(partition.ds_numel) if partition is not None else None


def held_numel(param: torch.Tensor) -> int:
    """Elements of `param` this rank holds at rest: all of a persistent or plain parameter, else its partition."""
    if not is_partitioned(param) or getattr(param, "ds_persist", False):
        return full_numel(param)
    return param.ds_tensor.numel()


def process_group(param: torch.Tensor) -> Any:
    """The process group a ZeRO-3 parameter is partitioned over (None: the world, or not partitioned)."""
    return getattr(param, "ds_process_group", None)


def local_grad(param: torch.Tensor) -> torch.Tensor | None:
    """This rank's gradient partition of a ZeRO-3 parameter (after the reduce-scatter at the boundary)."""
    from deepspeed.utils import safe_get_local_grad

    return safe_get_local_grad(param)


def set_local_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    """Write this rank's gradient partition back (also refreshes the offload path's per-parameter norm)."""
    from deepspeed.utils import safe_set_local_grad

    safe_set_local_grad(param, grad)


# --- the stage-3 optimizer -------------------------------------------------------------------


def zero3_optimizer(ds_engine: Any) -> Any | None:
    """The ZeRO stage-3 optimizer of a DeepSpeedEngine, or None when the engine is not stage 3."""
    zero = getattr(ds_engine, "optimizer", None)
    if ds_engine.zero_optimization_stage() != 3 or not hasattr(zero, "fp32_partitioned_groups_flat"):
        return None
    return zero


def basic_optimizers(zero: Any) -> list[torch.optim.Optimizer]:
    """The torch optimizer(s) the stage-3 optimizer steps: the main one and, if present, its backup."""
    out = [zero.optimizer]
    if getattr(zero, "backup_optimizer", None) is not None:
        out.append(zero.backup_optimizer)
    return out


def subgroups(zero: Any) -> list[tuple[list[torch.nn.Parameter], torch.Tensor]]:
    """(parameters, fp32 flat partition) of each optimizer sub-group."""
    return list(zip(zero.fp16_groups, zero.fp32_partitioned_groups_flat))


def grad_offset(zero: Any, param: torch.nn.Parameter) -> int:
    """Where `param`'s local partition starts in its sub-group's fp32 flat partition."""
    _, offset, _ = zero.grad_position[zero.get_param_id(param)]
    return int(offset)


def loss_scale(zero: Any) -> float:
    """The current loss scale (1 without fp16 loss scaling)."""
    return float(getattr(zero, "loss_scale", 1.0) or 1.0)


def wrap_step(zero: Any, before: Callable[[], Any]) -> Callable:
    """Make the stage-3 optimizer call `before()` at the start of each of its steps; returns the
    original step for `unwrap_step`."""
    original = zero.step

    def step(*args, **kwargs):
        before()
        return original(*args, **kwargs)

    zero.step = step
    return original


def unwrap_step(zero: Any, original: Callable) -> None:
    """Undo `wrap_step`."""
    zero.step = original


def optimizer_state_tensors(ds_engine: Any) -> list[torch.Tensor]:
    """This rank's optimizer memory: the fp32 partitions (ZeRO-3) plus the basic optimizer's state tensors."""
    zero = ds_engine.optimizer
    tensors = list(getattr(zero, "fp32_partitioned_groups_flat", []))
    inner = getattr(zero, "optimizer", zero)
    for state in inner.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    return tensors


@contextlib.contextmanager
def gathered(params: torch.nn.Parameter | list[torch.nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Gather ZeRO-3 partitioned parameters for reading (or writing on `modifier_rank`); no-op otherwise.

    Collective under ZeRO-3: every rank must enter it with the same parameters.
    """
    plist = params if isinstance(params, (list, tuple)) else [params]
    partitioned = [p for p in plist if is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed  # only when a parameter is partitioned, i.e. DeepSpeed is already running

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield
