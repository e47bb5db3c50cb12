"""Neuron scores from pooled activation statistics.

Each score function returns (harmful_score, benign_score), both [layers, width] float64; a
neuron is a safety neuron when it is in the per-layer top set of the harmful score and not in
the top set of the benign score.
"""

from __future__ import annotations

from typing import Callable

import torch

Stats = dict[str, torch.Tensor]  # {"count","sum","sumsq","abssum","poscount"} -> [layers, width]
SCORES = ("saliency", "contrast", "frequency")


def _mean(s: Stats) -> torch.Tensor:
    return s["sum"] / s["count"].clamp_min(1.0)


def _var(s: Stats) -> torch.Tensor:
    n = s["count"].clamp_min(1.0)
    return (s["sumsq"] / n - _mean(s) ** 2).clamp_min(0.0)


def saliency(harmful: Stats, benign: Stats, down_col_norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's score: |mean activation| x ||W_down[:, i]||_2, on harmful and on benign inputs."""
    return _mean(harmful).abs() * down_col_norms, _mean(benign).abs() * down_col_norms


def contrast(harmful: Stats, benign: Stats, down_col_norms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised difference of mean magnitudes: (|mean_h| - |mean_b|) / pooled std (benign: the negation)."""
    n_h, n_b = harmful["count"], benign["count"]
    pooled = ((n_h * _var(harmful) + n_b * _var(benign)) / (n_h + n_b).clamp_min(1.0)).sqrt().clamp_min(1e-12)
    d = (_mean(harmful).abs() - _mean(benign).abs()) / pooled
    return d, -d


def frequency(harmful: Stats, benign: Stats, down_col_norms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Difference of positive-activation rates (benign: the negation)."""
    rate_h = harmful["poscount"] / harmful["count"].clamp_min(1.0)
    rate_b = benign["poscount"] / benign["count"].clamp_min(1.0)
    return rate_h - rate_b, rate_b - rate_h


SCORE_FUNCTIONS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "saliency": saliency, "contrast": contrast, "frequency": frequency,
}


def compute_scores(name: str, harmful: Stats, benign: Stats, down_col_norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return SCORE_FUNCTIONS[name](harmful, benign, down_col_norms)
