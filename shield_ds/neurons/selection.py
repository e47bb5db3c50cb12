"""Selection: per-layer top-rho by harmful score minus the benign top set, then a parameter budget."""

from __future__ import annotations

import math

import torch

from shield_ds.errors import ShieldError


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


CAP_RANKINGS = ("layer-normalized", "raw")


def within_layer_rank(harmful_score: torch.Tensor) -> torch.Tensor:
    """[layers, width] int64: each neuron's rank by harmful score among all neurons of its layer (0 = best).

    Ties are broken by the lower index (the same stable order `select_per_layer` uses).
    """
    order = torch.argsort(-harmful_score, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(harmful_score.shape[1], dtype=order.dtype).expand_as(order).contiguous())
    return ranks


def cap_neurons(max_fraction: float, total_params: int, params_per_neuron: int) -> int:
    """How many neurons fit in `max_fraction` of all parameters."""
    return math.floor(max_fraction * total_params / params_per_neuron + 1e-9)


def cap_by_param_fraction(selected: dict[int, torch.Tensor], harmful_score: torch.Tensor, params_per_neuron: int,
                          total_params: int, max_fraction: float,
                          ranking: str = "layer-normalized") -> dict[int, torch.Tensor]:
    """Keep the best selected neurons (over all layers) within max_fraction of all parameters.

    `ranking` decides which candidates survive when the per-layer selection exceeds the budget:

    - "layer-normalized" (default): a candidate's key is its rank by harmful score among *all* neurons of
      its own layer (0 = the layer's best neuron). Raw scores are not comparable across layers (the
      activation scale, and so saliency, grows with depth), and a layer-sum normalisation breaks on
      signed scores (contrast and frequency can sum to ~0 or below); the within-layer rank is free of
      scale and sign for every score. The budget then fills rank tier by rank tier: every layer's best
      candidate, then every layer's second best, ... so it spreads over the layers the way the per-layer
      top-rho selection intended. Candidates whose layer lost its top neurons to the benign top set
      carry their true (worse) rank, so such layers get correspondingly fewer. Within a rank tier the
      ties are broken by the score relative to the layer's mean |harmful score| (scale-free), then by
      the lower layer and the lower index: the result is deterministic.
    - "raw": the harmful score itself, over all layers (ties: lower layer, lower index); the
      behaviour before `cap_ranking` existed, which piles the survivors into the deepest layers.
    """
    if ranking not in CAP_RANKINGS:
        raise ShieldError(f"--cap-ranking must be one of {', '.join(CAP_RANKINGS)}, not {ranking!r}")
    if max_fraction <= 0:
        return selected
    budget = cap_neurons(max_fraction, total_params, params_per_neuron)
    pairs = [(layer, i) for layer, idx in selected.items() for i in idx.tolist()]
    if len(pairs) <= budget:
        return selected
    if ranking == "raw":
        keys = [(-float(harmful_score[layer, i]), layer, i) for layer, i in pairs]
    else:
        ranks = within_layer_rank(harmful_score)
        scale = harmful_score.abs().mean(dim=1).clamp_min(torch.finfo(harmful_score.dtype).tiny)
        keys = [(int(ranks[layer, i]), -float(harmful_score[layer, i] / scale[layer]), layer, i) for layer, i in pairs]
    order = sorted(range(len(pairs)), key=keys.__getitem__)
    kept: dict[int, list[int]] = {layer: [] for layer in selected}
    for n in order[:budget]:
        layer, i = pairs[n]
        kept[layer].append(i)
    return {layer: torch.tensor(sorted(v), dtype=torch.int64) for layer, v in kept.items()}


def param_fraction(selected: dict[int, torch.Tensor], params_per_neuron: int, total_params: int) -> float:
    count = sum(int(v.numel()) for v in selected.values())
    return count * params_per_neuron / total_params
