"""Masked training of selected FFN neurons under ZeRO-3: partition arithmetic, per-rank masks,
the gradient-mask / weight-decay hook, neuron projections (sliced weight gradients) and delta mode's
slice parameters."""

from shield_ds.masking.delta import attach_deltas, delta_masks, delta_state, merge_deltas
from shield_ds.masking.grad_mask import GradientMasker
from shield_ds.masking.neuron_linear import NeuronLinear
from shield_ds.masking.partition import param_partition, partition_range, partition_size
from shield_ds.masking.partition_mask import PartitionMask, build_masks, freeze_unselected

__all__ = ["PartitionMask", "GradientMasker", "NeuronLinear", "build_masks", "freeze_unselected", "attach_deltas", "delta_masks",
           "delta_state", "merge_deltas", "param_partition", "partition_range", "partition_size"]
