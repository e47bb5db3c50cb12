"""Safety-neuron identification: statistics hooks, reduction, scores, selection, the NeuronSet file."""

from shield_ds.neurons.neuron_set import NeuronSet

__all__ = ["NeuronSet"]
