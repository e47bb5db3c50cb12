"""`--update delta`: train small slice parameters instead of masking full matrices.

All base weights are frozen. Every projection of a layer with selected neurons becomes a neuron
projection (`neuron_linear`) and gets
- `shield_slice` (parameter): [k, in] for a row projection (gate_proj, up_proj), [out, k] for down_proj;
- `shield_slice_bias` (parameter, [k]) for a row projection with a bias.
They start as copies of the selected rows/columns. In forward the frozen projection runs as it is and
only the selected output channels (rows) or the selected input channels' contribution (columns) come
from the slices; no copy of the base weight is made (see `neuron_linear`). They are registered ON the
projection module, so ZeRO-3 partitions them and gathers them together with the module's weight, and
the optimizer (and its state) only ever sees them: about 0.03% of the model, not whole FFN matrices.

They hold the selected values themselves, not a difference to the base: with the same arithmetic as
mask mode (see `neuron_linear`), SGD steps are then bit-identical to mask mode, and weight decay of
the slice parameters is weight decay of the merged weight.
"""

from __future__ import annotations

import torch
from torch import nn

from shield_ds.dist import get_logger
from shield_ds.zero_internals import gathered
from shield_ds.masking.neuron_linear import (DIM, NEURONS, SLICE, SLICE_BIAS, make_neuron_linear,
                                             neuron_projections, restore_linear)
from shield_ds.masking.partition import param_partition
from shield_ds.masking.partition_mask import PartitionMask
from shield_ds.neurons.neuron_set import NeuronSet

log = get_logger("masking")


def delta_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, projection) of every module carrying slice parameters."""
    return [(name, m) for name, m in model.named_modules() if hasattr(m, SLICE)]


@torch.no_grad()
def attach_deltas(model: nn.Module, adapter, neuron_set: NeuronSet) -> list[str]:
    """Freeze every parameter and attach slice parameters (copies of the selected rows/columns).

    Call before deepspeed.initialize (collective under zero.Init: weights are gathered to copy the
    slices). Returns the names of the new trainable parameters.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    for linear, neurons, dim in neuron_projections(model, adapter, neuron_set):
        _attach(linear, neurons, dim)
    names = [f"{name}.{attr}" for name, m in delta_modules(model) for attr in (SLICE, SLICE_BIAS) if hasattr(m, attr)]
    log.info("delta mode: %d slice tensors, %d trainable parameters", len(names),
             sum(p.numel() for n, p in model.named_parameters() if p.requires_grad))
    return names


def _attach(linear: nn.Linear, neurons: torch.Tensor, dim: int) -> None:
    make_neuron_linear(linear, neurons, dim)
    index = getattr(linear, NEURONS)
    with gathered([linear.weight, linear.bias]):
        piece = linear.weight.detach().index_select(dim, index).clone()
        bias = linear.bias.detach().index_select(0, index).clone() if dim == 0 and linear.bias is not None else None
    linear.register_parameter(SLICE, nn.Parameter(piece))
    if bias is not None:
        linear.register_parameter(SLICE_BIAS, nn.Parameter(bias))


def delta_masks(model: nn.Module) -> dict[str, PartitionMask]:
    """Full masks for every slice tensor (all of it trains), for GradientMasker (call after initialize)."""
    masks: dict[str, PartitionMask] = {}
    for name, module in delta_modules(model):
        for attr in (SLICE, SLICE_BIAS):
            if hasattr(module, attr):
                world, rank, numel, _ = param_partition(getattr(module, attr))
                masks[f"{name}.{attr}"] = PartitionMask.everything(numel, world, rank, name=f"{name}.{attr}")
    return masks


@torch.no_grad()
def delta_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full slice tensors and neuron indices, keyed by projection name (CPU); tests/test_masking.py
    checks the delta layout with it (the export merges the deltas with `merge_deltas` instead).

    Collective under ZeRO-3 (every rank must call it).
    """
    state: dict[str, torch.Tensor] = {}
    for name, module in delta_modules(model):
        params = [getattr(module, attr) for attr in (SLICE, SLICE_BIAS) if hasattr(module, attr)]
        with gathered(params):
            for attr in (SLICE, SLICE_BIAS):
                if hasattr(module, attr):
                    state[f"{name}.{attr}"] = getattr(module, attr).detach().to("cpu", copy=True)
        state[f"{name}.{NEURONS}"] = getattr(module, NEURONS).to("cpu", copy=True)
    return state


@torch.no_grad()
def merge_deltas(model: nn.Module) -> int:
    """Write every slice into its base weight, then remove slices and the neuron forward; returns the count.

    Works on plain modules and on ZeRO-3 modules (collective: weights are gathered, updated on all
    ranks identically and re-partitioned). For export at the end of training: the optimizer of an
    engine still holding the slices must not step afterwards.
    """
    merged = 0
    for _, module in delta_modules(model):
        index = getattr(module, NEURONS)
        dim = getattr(module, DIM)
        piece, piece_bias = getattr(module, SLICE), getattr(module, SLICE_BIAS, None)
        with gathered([module.weight, module.bias, piece, piece_bias], modifier_rank=0):
            weight = module.weight.data
            weight.index_copy_(dim, index.to(weight.device), piece.data.to(weight.dtype))
            if piece_bias is not None:
                module.bias.data.index_copy_(0, index.to(weight.device), piece_bias.data.to(module.bias.dtype))
        for attr in (SLICE, SLICE_BIAS):
            module._parameters.pop(attr, None)
        restore_linear(module)
        merged += 1
    return merged
