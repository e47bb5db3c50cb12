"""`PartitionMask`: which entries of this rank's local ZeRO-3 partition belong to selected neurons.

Built from (shape, selected rows or columns, world, rank) by interval arithmetic, never from a dense
full-size mask (at 70B one dense boolean mask per FFN matrix would be hundreds of MB per rank).
A neuron i of a decoder layer owns row i of every "row" projection (gate_proj, up_proj; their bias
entry i when they have one) and column i of down_proj.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shield_ds.dist import get_logger
from shield_ds.masking.neuron_linear import make_neuron_linear, neuron_projections
from shield_ds.masking.partition import param_partition, param_shape, partition_range, partition_size
from shield_ds.neurons.neuron_set import NeuronSet

log = get_logger("masking")


def _as_index(values) -> torch.Tensor:
    return torch.unique(torch.as_tensor(values, dtype=torch.int64).flatten())  # sorted, unique


@dataclass
class PartitionMask:
    """Selected entries of one parameter's local flat partition on one rank.

    `local` holds sorted int64 offsets into the local partition (length `partition_size`), i.e.
    global flat index minus `start`; everything else of the partition is outside the mask.
    """

    name: str
    local: torch.Tensor
    numel: int
    world: int
    rank: int

    @property
    def partition_size(self) -> int:
        return partition_size(self.numel, self.world)

    @property
    def start(self) -> int:
        return partition_range(self.numel, self.world, self.rank)[0]

    @property
    def count(self) -> int:
        return int(self.local.numel())

    @classmethod
    def for_rows(cls, shape, rows, world: int, rank: int, name: str = "") -> "PartitionMask":
        """Rows `rows` of a [R, C] matrix (or entries of a 1-D vector): row i is flat [i*C, (i+1)*C)."""
        shape = tuple(int(s) for s in shape)
        cols = shape[1] if len(shape) == 2 else 1
        numel = shape[0] * cols
        start, end = partition_range(numel, world, rank)
        rows = _as_index(rows)
        _check_range(rows, shape[0], name, "row")
        first = (rows * cols).clamp(min=start, max=end)
        last = (rows * cols + cols).clamp(min=start, max=end)
        lengths = last - first
        keep = lengths > 0
        first, lengths = first[keep], lengths[keep]
        if first.numel() == 0:
            return cls(name, torch.empty(0, dtype=torch.int64), numel, world, rank)
        # Concatenate the aranges [first_k, first_k + lengths_k) without a Python loop.
        offsets = torch.arange(int(lengths.sum())) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
        local = torch.repeat_interleave(first - start, lengths) + offsets
        return cls(name, local, numel, world, rank)

    @classmethod
    def for_cols(cls, shape, cols, world: int, rank: int, name: str = "") -> "PartitionMask":
        """Columns `cols` of a [R, C] matrix: entry (i, j) is flat i*C + j."""
        n_rows, n_cols = (int(s) for s in shape)
        numel = n_rows * n_cols
        start, end = partition_range(numel, world, rank)
        cols = _as_index(cols)
        _check_range(cols, n_cols, name, "column")
        if start == end or cols.numel() == 0:
            return cls(name, torch.empty(0, dtype=torch.int64), numel, world, rank)
        # Only the rows that overlap [start, end) can contribute.
        touched = torch.arange(start // n_cols, (end - 1) // n_cols + 1, dtype=torch.int64)
        flat = (touched[:, None] * n_cols + cols[None, :]).flatten()
        flat = flat[(flat >= start) & (flat < end)]
        return cls(name, flat - start, numel, world, rank)

    @classmethod
    def everything(cls, numel: int, world: int, rank: int, name: str = "") -> "PartitionMask":
        """All real (non-padding) entries of the local partition: for parameters trained in full (deltas)."""
        start, end = partition_range(numel, world, rank)
        return cls(name, torch.arange(end - start, dtype=torch.int64), numel, world, rank)

    def to(self, device: torch.device | str) -> "PartitionMask":
        return PartitionMask(self.name, self.local.to(device), self.numel, self.world, self.rank)

    @torch.no_grad()
    def apply_(self, local_flat: torch.Tensor) -> torch.Tensor:
        """Zero every entry of `local_flat` (this rank's partition, length P) outside the mask, in place."""
        if local_flat.numel() != self.partition_size:
            raise ValueError(f"{self.name}: local partition has {local_flat.numel()} elements, "
                             f"expected {self.partition_size}")
        flat = local_flat.view(-1)
        index = self.local.to(flat.device)
        kept = flat.index_select(0, index)
        flat.zero_()
        flat.index_copy_(0, index, kept)
        return local_flat


def _check_range(index: torch.Tensor, size: int, name: str, what: str) -> None:
    if index.numel() and (int(index[0]) < 0 or int(index[-1]) >= size):
        raise ValueError(f"{name}: {what} index out of range [0, {size}): {index.tolist()[:5]}...")


def _named(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def neuron_params(model: nn.Module, adapter, neuron_set: NeuronSet) -> list[tuple[str, nn.Parameter, str, torch.Tensor]]:
    """(name, parameter, "rows"|"cols", neuron indices) for every parameter holding selected neurons.

    Row projections contribute their weight and bias (bias entry i belongs to neuron i); down_proj
    contributes its weight only (its bias belongs to no neuron).
    """
    names = _named(model)
    out = []
    for linear, neurons, dim in neuron_projections(model, adapter, neuron_set):
        kind = "rows" if dim == 0 else "cols"
        out.append((names[id(linear.weight)], linear.weight, kind, neurons))
        if kind == "rows" and linear.bias is not None:
            out.append((names[id(linear.bias)], linear.bias, kind, neurons))
    return out


def build_masks(model: nn.Module, adapter, neuron_set: NeuronSet) -> dict[str, PartitionMask]:
    """One PartitionMask per parameter holding selected neurons, for this rank's partitions.

    Call after deepspeed.initialize (or inside zero.Init): the partition layout is read from the
    ZeRO-3 parameters; plain parameters give world 1.
    """
    masks: dict[str, PartitionMask] = {}
    for name, param, kind, neurons in neuron_params(model, adapter, neuron_set):
        world, rank, _, _ = param_partition(param)
        build = PartitionMask.for_rows if kind == "rows" else PartitionMask.for_cols
        masks[name] = build(param_shape(param), neurons, world, rank, name=name)
    return masks


def freeze_unselected(model: nn.Module, adapter, neuron_set: NeuronSet, *, sliced_grad: bool = True) -> list[str]:
    """Set requires_grad=False on every parameter that holds no selected neuron; returns the trainable names.

    Call before deepspeed.initialize so the optimizer only ever sees the selected matrices. With
    `sliced_grad` (the default) the selected projections also become neuron projections
    (`neuron_linear`): their weight gradient is computed for the selected slices only, with the same
    arithmetic as delta mode, instead of a full weight-gradient product that the mask would zero.
    """
    trainable = {id(param) for _, param, _, _ in neuron_params(model, adapter, neuron_set)}
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(id(param) in trainable)
        if id(param) in trainable:
            names.append(name)
    if sliced_grad:
        for linear, neurons, dim in neuron_projections(model, adapter, neuron_set):
            make_neuron_linear(linear, neurons, dim)
    log.info("masking: %d parameter tensors trainable (selected neurons in %d layers)", len(names),
             sum(1 for v in neuron_set.layers.values() if v.numel()))
    return names
