"""ZeRO-3 partition arithmetic: the one place that knows which flat range of a parameter a rank holds.

ZeRO-3 flattens a parameter of N elements, pads it to W * P with P = ceil(N / W), and gives rank r
the slice [r * P, (r + 1) * P). The real elements of rank r are [r * P, min((r + 1) * P, N)); the
rest of its local partition (only possible on the last ranks) is padding. W and r come from the
parameter's own process group (`param.ds_process_group`), which need not be the world.
"""

from __future__ import annotations

import torch.distributed as torch_dist
from torch import nn

from shield_ds import zero_internals as zi


def partition_size(numel: int, world: int) -> int:
    """P = ceil(numel / world): the local partition length every rank holds (padding included)."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    return -(-int(numel) // int(world))


def partition_range(numel: int, world: int, rank: int) -> tuple[int, int]:
    """The real flat range [start, end) of `rank`; empty (start == end) when it holds only padding."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world of size {world}")
    size = partition_size(numel, world)
    start = min(rank * size, int(numel))
    return start, min(start + size, int(numel))


is_zero3_param = zi.is_partitioned
param_shape = zi.full_shape


def param_partition(param: nn.Parameter) -> tuple[int, int, int, int]:
    """(world, rank, numel, P) of a parameter: from its ZeRO-3 process group, or (1, 0, N, N) for a plain one."""
    if not is_zero3_param(param):
        return 1, 0, param.numel(), param.numel()
    group = zi.process_group(param)
    if torch_dist.is_available() and torch_dist.is_initialized():
        world, rank = torch_dist.get_world_size(group=group), torch_dist.get_rank(group=group)
    else:
        world, rank = 1, 0
    numel = zi.full_numel(param)
    size = partition_size(numel, world)
    local = zi.partition_numel(param) or size
    if local != size:  # a layout this module does not know (e.g. hpZ secondary partitions): refuse loudly
        raise RuntimeError(f"ZeRO-3 partition of {numel} elements over {world} ranks has {local} local "
                           f"elements, expected {size}")
    return world, rank, numel, size
