"""Causal ablation: zero chosen neurons' activations at inference through forward pre-hooks."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from shield_ds.neurons.neuron_set import NeuronSet


@contextlib.contextmanager
def ablate_neurons(model: torch.nn.Module, adapter, neuron_set: NeuronSet) -> Iterator[None]:
    """Within the block, the selected neurons (inputs of each layer's down projection) read 0."""
    handles = []
    for layer_index, layer in enumerate(adapter.decoder_layers(model)):
        indices = neuron_set.indices(layer_index)
        if indices.numel() == 0:
            continue

        def hook(_module, args, indices=indices):
            x = args[0].clone()
            x[..., indices.to(x.device)] = 0
            return (x, *args[1:])

        handles.append(adapter.neuron_module(layer).register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def random_like(neuron_set: NeuronSet, seed: int) -> NeuronSet:
    """A control set: the same number of neurons per layer, drawn uniformly at random (seeded)."""
    control = NeuronSet.random_like(neuron_set, seed)
    control.meta["control_seed"] = seed
    return control
