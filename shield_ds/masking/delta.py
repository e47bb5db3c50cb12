"""`--update delta`: train small delta parameters instead of masking full matrices.

All base weights are frozen. Every projection of a layer with selected neurons gets
- `shield_neurons` (int64 buffer): the selected neuron indices of its layer;
- `shield_delta` (parameter): [k, in] for a row projection (gate_proj, up_proj), [out, k] for down_proj;
- `shield_delta_bias` (parameter, [k]) for a row projection with a bias.
They are registered ON the projection module, so ZeRO-3 partitions them and gathers them together
with the module's weight. A forward hook adds their contribution to the base output:

    row projection:  out[..., neurons] += x @ delta.T (+ delta_bias)
    down projection: out += x[..., neurons] @ delta.T

i.e. the module computes x @ (W + scatter(delta)).T without ever materialising a second weight
(which autograd would keep alive for every layer until backward). The deltas start at zero, so the
first forward is bit-identical to the base model. Against mask mode: the delta gradient is the
selected slice of the same weight gradient, but computed by a smaller GEMM, so it may differ from the
mask-mode slice by BLAS accumulation order (observed: bit-identical, or 1 ulp in single entries,
for one SGD step with a power-of-two lr); later steps add the rounding of W + delta vs. the merged
weight (~2e-7 relative after 3 AdamW steps in fp32). Strict bit-identity would need the full-width
weight-gradient GEMM per projection, i.e. mask mode's cost, which delta mode exists to avoid.

Weight decay must act on the merged weight W + delta, not on delta: pass the `bases` of
`delta_masks` to `GradientMasker`, which owns the decay in both modes.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from shield_ds.dist import get_logger
from shield_ds.masking.partition import is_zero3_param, param_partition
from shield_ds.masking.partition_mask import PartitionMask
from shield_ds.neurons.neuron_set import NeuronSet

log = get_logger("masking")

NEURONS = "shield_neurons"
DELTA = "shield_delta"
DELTA_BIAS = "shield_delta_bias"
KIND = "_shield_delta_kind"  # "rows" | "cols"
HOOK = "_shield_delta_hook"


def _row_hook(module: nn.Linear, inputs, output):
    delta = F.linear(inputs[0], getattr(module, DELTA), getattr(module, DELTA_BIAS, None))
    return output.index_add(output.dim() - 1, getattr(module, NEURONS), delta.to(output.dtype))


def _col_hook(module: nn.Linear, inputs, output):
    x = inputs[0].index_select(inputs[0].dim() - 1, getattr(module, NEURONS))
    return output + F.linear(x, getattr(module, DELTA)).to(output.dtype)


def _gathered(params: list[nn.Parameter], modifier_rank: int | None = None):
    """Gather ZeRO-3 parameters for the block (no-op for plain ones)."""
    zero_params = [p for p in params if p is not None and is_zero3_param(p)]
    if not zero_params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(zero_params, modifier_rank=modifier_rank)


def delta_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, projection) of every module carrying delta parameters."""
    return [(name, m) for name, m in model.named_modules() if hasattr(m, KIND)]


def attach_deltas(model: nn.Module, adapter, neuron_set: NeuronSet) -> list[str]:
    """Freeze every parameter and attach zero-initialised delta parameters + forward hooks.

    Call before deepspeed.initialize. Returns the names of the new trainable parameters.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    for layer_index, layer in enumerate(adapter.decoder_layers(model)):
        neurons = neuron_set.indices(layer_index)
        if neurons.numel() == 0:
            continue
        ffn = adapter.ffn(layer)
        for linear in ffn.rows.values():
            _attach(linear, neurons, "rows")
        _attach(ffn.down, neurons, "cols")
    names = [f"{name}.{attr}" for name, m in delta_modules(model) for attr in (DELTA, DELTA_BIAS) if hasattr(m, attr)]
    log.info("delta mode: %d delta tensors, %d trainable parameters", len(names),
             sum(p.numel() for n, p in model.named_parameters() if p.requires_grad))
    return names


def _attach(linear: nn.Linear, neurons: torch.Tensor, kind: str) -> None:
    if hasattr(linear, KIND):
        raise RuntimeError(f"{linear} already carries deltas")
    weight = linear.weight
    k = int(neurons.numel())
    shape = (k, linear.in_features) if kind == "rows" else (linear.out_features, k)
    linear.register_buffer(NEURONS, neurons.clone().to(weight.device), persistent=False)
    linear.register_parameter(DELTA, nn.Parameter(torch.zeros(shape, dtype=weight.dtype, device=weight.device)))
    if kind == "rows" and linear.bias is not None:
        linear.register_parameter(DELTA_BIAS, nn.Parameter(torch.zeros(k, dtype=weight.dtype, device=weight.device)))
    setattr(linear, KIND, kind)
    setattr(linear, HOOK, linear.register_forward_hook(_row_hook if kind == "rows" else _col_hook))


def _base_slices(module: nn.Module) -> dict[str, torch.Tensor]:
    """The base values each delta tensor of `module` adds to (CPU, fp32)."""
    neurons = getattr(module, NEURONS).cpu()
    with _gathered([module.weight, module.bias]):
        weight = module.weight.detach().float().cpu()
        if getattr(module, KIND) == "rows":
            out = {DELTA: weight.index_select(0, neurons)}
            if hasattr(module, DELTA_BIAS):
                out[DELTA_BIAS] = module.bias.detach().float().cpu().index_select(0, neurons)
        else:
            out = {DELTA: weight.index_select(1, neurons)}
    return out


def delta_masks(model: nn.Module, with_bases: bool = True) -> tuple[dict[str, PartitionMask], dict[str, torch.Tensor]]:
    """Full masks for every delta tensor (all of it trains) and its base values, for GradientMasker.

    Call after deepspeed.initialize on `engine.module` (collective under ZeRO-3 when with_bases).
    """
    masks: dict[str, PartitionMask] = {}
    bases: dict[str, torch.Tensor] = {}
    for name, module in delta_modules(model):
        slices = _base_slices(module) if with_bases else {}
        for attr in (DELTA, DELTA_BIAS):
            if not hasattr(module, attr):
                continue
            world, rank, numel, _ = param_partition(getattr(module, attr))
            masks[f"{name}.{attr}"] = PartitionMask.everything(numel, world, rank, name=f"{name}.{attr}")
            if with_bases:
                bases[f"{name}.{attr}"] = slices[attr]
    return masks, bases


@torch.no_grad()
def delta_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full delta tensors and neuron indices, keyed by projection name (CPU), for the patch file.

    Collective under ZeRO-3 (every rank must call it).
    """
    state: dict[str, torch.Tensor] = {}
    for name, module in delta_modules(model):
        params = [getattr(module, attr) for attr in (DELTA, DELTA_BIAS) if hasattr(module, attr)]
        with _gathered(params):
            for attr in (DELTA, DELTA_BIAS):
                if hasattr(module, attr):
                    state[f"{name}.{attr}"] = getattr(module, attr).detach().cpu().clone()
        state[f"{name}.{NEURONS}"] = getattr(module, NEURONS).cpu().clone()
    return state


@torch.no_grad()
def merge_deltas(model: nn.Module) -> int:
    """Add every delta into its base weight, then remove deltas and hooks; returns the merged count.

    Works on plain modules and on ZeRO-3 modules (collective: weights are gathered, updated on all
    ranks identically and re-partitioned). For export at the end of training: the optimizer of an
    engine still holding the deltas must not step afterwards.
    """
    merged = 0
    for _, module in delta_modules(model):
        neurons = getattr(module, NEURONS)
        kind = getattr(module, KIND)
        delta = getattr(module, DELTA)
        delta_bias = getattr(module, DELTA_BIAS, None)
        with _gathered([module.weight, module.bias, delta, delta_bias], modifier_rank=0):
            weight = module.weight.data
            index = neurons.to(weight.device)
            weight.index_add_(0 if kind == "rows" else 1, index, delta.data.to(weight.dtype))
            if delta_bias is not None:
                module.bias.data.index_add_(0, index, delta_bias.data.to(module.bias.dtype))
        getattr(module, HOOK).remove()
        for attr in (DELTA, DELTA_BIAS):
            module._parameters.pop(attr, None)
        module._buffers.pop(NEURONS, None)
        delattr(module, KIND)
        delattr(module, HOOK)
        merged += 1
    return merged
