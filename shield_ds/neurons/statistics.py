"""Per-neuron activation statistics: forward hooks, float64 accumulation, one coalesced all-reduce.

A neuron is one channel of the input of a decoder layer's down projection. For every group
(label.language.modality) and neuron we accumulate, per rank, over the selected prompt tokens:
token count, sum, sum of squares, sum of absolute values and count of positive activations.
Sums are float64, so the all-reduced result does not depend on how records were split across
ranks beyond float64 rounding.
"""

from __future__ import annotations

from typing import Sequence

import torch

from shield_ds import dist
from shield_ds.errors import ShieldError

STATS = ("count", "sum", "sumsq", "abssum", "poscount")


class ActivationStatistics:
    """Accumulators of shape [groups, stats, layers, width] in float64 on one device."""

    def __init__(self, groups: Sequence[str], num_layers: int, width: int, device: torch.device | str = "cpu"):
        self.groups = list(groups)
        self.group_index = {g: i for i, g in enumerate(self.groups)}
        self.num_layers = num_layers
        self.width = width
        self.acc = torch.zeros(len(self.groups), len(STATS), num_layers, width, dtype=torch.float64, device=device)
        # Set by the caller before each forward pass: (group index, flat token positions, count) per group.
        self._selection: list[tuple[int, torch.Tensor, int]] | None = None
        self._shape: tuple[int, ...] = ()
        self._row_groups: list[str | None] | None = None  # set_batch_rows mode
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    # --- batch context -----------------------------------------------------------------------
    def set_batch(self, token_mask: torch.Tensor, sample_groups: Sequence[str | None]) -> None:
        """Declare which tokens of the next forward count, and the group of each sample (None = skip).

        The flat token positions of each group are computed here once per batch, so the per-layer
        hooks do no host-device synchronisation.
        """
        token_mask = token_mask.bool()
        self._shape = tuple(token_mask.shape)
        self._selection = []
        flat_mask = token_mask.reshape(-1)
        per_sample = token_mask.shape[1] if token_mask.dim() > 1 else 1
        for group in sorted({g for g in sample_groups if g is not None}):
            rows = torch.tensor([i for i, g in enumerate(sample_groups) if g == group], device=token_mask.device)
            sample_of_token = torch.zeros(len(sample_groups), dtype=torch.bool, device=token_mask.device)
            sample_of_token[rows] = True
            positions = torch.nonzero(flat_mask & sample_of_token.repeat_interleave(per_sample)).squeeze(1)
            self._selection.append((self.group_index[group], positions, int(positions.numel())))

    def set_batch_rows(self, sample_groups: Sequence[str | None]) -> None:
        """For encoders whose rows are per-sample blocks (vision towers): the rows of one forward are split
        evenly over the samples, in order, and every row counts (checked against the shape at hook time)."""
        self._row_groups = list(sample_groups)
        self._selection = []
        self._shape = ()

    def clear_batch(self) -> None:
        self._selection = None
        self._row_groups = None

    def _row_selection(self, rows: int, layer: int) -> list[tuple[int, torch.Tensor, int]]:
        samples = len(self._row_groups)
        if rows % samples:
            raise ShieldError(f"vision layer {layer}: {rows} encoder rows for {samples} images; --scope lm+vision "
                              f"needs images of one size within a batch (e.g. typographic views, or --batch-size 1)")
        per = rows // samples
        out = []
        for group in sorted({g for g in self._row_groups if g is not None}):
            rows_of = [torch.arange(i * per, (i + 1) * per) for i, g in enumerate(self._row_groups) if g == group]
            positions = torch.cat(rows_of)
            out.append((self.group_index[group], positions, int(positions.numel())))
        return out

    # --- hooks -------------------------------------------------------------------------------
    def attach(self, modules: Sequence[torch.nn.Module]) -> None:
        """Register a forward pre-hook on each layer's down projection (its input = the neurons)."""
        for layer, module in enumerate(modules):
            self._handles.append(module.register_forward_pre_hook(self._make_hook(layer)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_hook(self, layer: int):
        def hook(_module, args):
            if self._selection is not None:
                self.accumulate(layer, args[0])
            return None

        return hook

    @torch.no_grad()
    def accumulate(self, layer: int, activations: torch.Tensor) -> None:
        """Add one layer's activations [B, T, width] for the current batch's counted tokens."""
        flat = activations.reshape(-1, activations.shape[-1])
        if self._row_groups is not None:
            selection = self._row_selection(flat.shape[0], layer)
        elif tuple(activations.shape[:-1]) != self._shape:
            raise RuntimeError(f"neuron activations of shape {tuple(activations.shape)} do not match the token "
                               f"mask {self._shape} (layer {layer})")
        else:
            selection = self._selection
        for g, positions, count in selection:
            if count == 0:
                continue
            x = flat.index_select(0, positions.to(flat.device)).to(device=self.acc.device, dtype=torch.float64)
            acc = self.acc[g, :, layer]  # a view: the in-place adds below update self.acc
            acc[0] += count
            acc[1] += x.sum(0)
            acc[2] += (x * x).sum(0)
            acc[3] += x.abs().sum(0)
            acc[4] += (x > 0).sum(0, dtype=torch.float64)

    # --- reduction and access ----------------------------------------------------------------
    def all_reduce(self) -> None:
        """Sum the accumulators over all ranks in one collective call."""
        dist.all_reduce(self.acc)

    def to_cpu(self) -> None:
        """Move the accumulators to the CPU (after the all-reduce): scoring, selection and writing are
        CPU work, next to the down-column norms, which are gathered to the CPU one layer at a time."""
        self.acc = self.acc.cpu()

    def get(self, group: str, stat: str) -> torch.Tensor:
        return self.acc[self.group_index[group], STATS.index(stat)]

    def pooled(self, groups: Sequence[str]) -> dict[str, torch.Tensor]:
        """Statistics summed over several groups: {stat: [layers, width]}."""
        idx = [self.group_index[g] for g in groups]
        total = self.acc[idx].sum(0)
        return {name: total[i] for i, name in enumerate(STATS)}

    def token_counts(self) -> dict[str, int]:
        """Counted tokens per group (layer 0, which every forward reaches)."""
        return {g: int(self.acc[i, 0].max()) for i, g in enumerate(self.groups)}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor]) -> "ActivationStatistics":
        """Statistics back from `state_dict()`'s layout (groups in sorted order); other keys are refused."""
        by_group: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            group, _, stat = key.rpartition(".")
            if stat not in STATS or not group:
                raise ValueError(f"unexpected statistics tensor {key!r}")
            by_group.setdefault(group, {})[stat] = value
        groups = sorted(by_group)
        incomplete = [g for g in groups if set(by_group[g]) != set(STATS)]
        if incomplete:
            raise ValueError(f"statistics of group {incomplete[0]!r} are incomplete")
        num_layers, width = by_group[groups[0]][STATS[0]].shape
        out = cls(groups, num_layers, width)
        for gi, group in enumerate(groups):
            for si, stat in enumerate(STATS):
                out.acc[gi, si] = by_group[group][stat].to(torch.float64)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """`{group}.{stat}` -> [layers, width] float64 (the stats.safetensors layout)."""
        return {f"{g}.{s}": self.acc[gi, si].detach().cpu().contiguous()
                for gi, g in enumerate(self.groups) for si, s in enumerate(STATS)}
