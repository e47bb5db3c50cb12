"""Selection: per-layer top-rho by harmful score minus the benign top set, then a parameter budget."""

from __future__ import annotations

import math

import torch


def top_k(ratio: float, width: int) -> int:
    """How many neurons per layer a ratio keeps (at least one for a positive ratio)."""
    return 0 if ratio <= 0 else min(width, max(1, round(ratio * width)))


def _top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    # Stable ordering: ties broken by the lower index, so the answer is reproducible.
    order = torch.argsort(-scores, stable=True)
    return order[:k]


def select_per_layer(harmful_score: torch.Tensor, benign_score: torch.Tensor, ratio: float) -> dict[int, torch.Tensor]:
    """{layer: sorted indices} in the harmful top-rho and not in the benign top-rho."""
    num_layers, width = harmful_score.shape
    k = top_k(ratio, width)
    selected: dict[int, torch.Tensor] = {}
    for layer in range(num_layers):
        top_h = _top_indices(harmful_score[layer], k)
        top_b = _top_indices(benign_score[layer], k)
        keep = top_h[~torch.isin(top_h, top_b)]
        selected[layer] = keep.sort().values
    return selected


def cap_by_param_fraction(selected: dict[int, torch.Tensor], harmful_score: torch.Tensor, params_per_neuron: int,
                          total_params: int, max_fraction: float) -> dict[int, torch.Tensor]:
    """Keep the highest-scoring selected neurons (over all layers) within max_fraction of all parameters."""
    if max_fraction <= 0:
        return selected
    budget = math.floor(max_fraction * total_params / params_per_neuron + 1e-9)
    candidates = [(float(harmful_score[layer, i]), -layer, -int(i), layer, int(i))
                  for layer, idx in selected.items() for i in idx.tolist()]
    if len(candidates) <= budget:
        return selected
    candidates.sort(reverse=True)
    kept: dict[int, list[int]] = {layer: [] for layer in selected}
    for *_, layer, i in candidates[:budget]:
        kept[layer].append(i)
    return {layer: torch.tensor(sorted(v), dtype=torch.int64) for layer, v in kept.items()}


def param_fraction(selected: dict[int, torch.Tensor], params_per_neuron: int, total_params: int) -> float:
    count = sum(int(v.numel()) for v in selected.values())
    return count * params_per_neuron / total_params
