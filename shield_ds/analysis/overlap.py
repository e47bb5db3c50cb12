"""Overlap between neuron sets, and how surprising it is under random sets of the same sizes.

Sets are compared as (layer, neuron) pairs. Null model for the p-value: in every layer l, each set is a
uniformly random subset of the N = intermediate_size neurons with its observed size (a_l, b_l), independent
across layers and sets. The overlap in layer l is then hypergeometric (population N, a_l marked, b_l drawn);
the total overlap is the sum over layers, whose pmf is the exact convolution of the per-layer pmfs, and
p = P(total >= observed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from scipy.stats import hypergeom

from shield_ds.data.records import parse_group
from shield_ds.errors import ShieldError
from shield_ds.neurons.neuron_set import NeuronSet

Pairs = set[tuple[int, int]]


def _pairs(x: NeuronSet | Pairs) -> Pairs:
    return x.as_pairs() if isinstance(x, NeuronSet) else set(x)


def jaccard(a: NeuronSet | Pairs, b: NeuronSet | Pairs) -> float:
    """|A ∩ B| / |A ∪ B| (0 for two empty sets)."""
    a, b = _pairs(a), _pairs(b)
    union = len(a | b)
    return len(a & b) / union if union else 0.0


def overlap_coefficient(a: NeuronSet | Pairs, b: NeuronSet | Pairs) -> float:
    """|A ∩ B| / min(|A|, |B|) (0 when either is empty)."""
    a, b = _pairs(a), _pairs(b)
    smaller = min(len(a), len(b))
    return len(a & b) / smaller if smaller else 0.0


def _check_comparable(a: NeuronSet, b: NeuronSet, names: tuple[str, str] = ("a", "b")) -> None:
    got_a, got_b = (a.num_layers, a.intermediate_size), (b.num_layers, b.intermediate_size)
    if got_a != got_b:
        raise ShieldError(f"neuron sets {names[0]} and {names[1]} come from different model shapes "
                          f"((layers, intermediate) {got_a} vs {got_b})")


def overlap_null_pmf(sizes_a: Sequence[int], sizes_b: Sequence[int], population: int) -> np.ndarray:
    """pmf of the total overlap of random per-layer subsets of sizes a_l, b_l out of `population`
    (index k = P(total == k); values beyond the returned length underflow float64)."""
    if len(sizes_a) != len(sizes_b):
        raise ValueError(f"per-layer sizes differ in length: {len(sizes_a)} vs {len(sizes_b)}")
    pmf = np.ones(1)
    for a_l, b_l in zip(sizes_a, sizes_b):
        if a_l == 0 or b_l == 0:
            continue
        support = np.arange(min(a_l, b_l) + 1)
        # scipy's naming: M = population, n = marked, N = drawn
        # exp(logpmf): same values to ~1e-10 relative even deep in the tail, and ~40x faster than
        # scipy's pmf for the thousands-wide supports of real models
        layer_pmf = np.exp(hypergeom(M=population, n=a_l, N=b_l).logpmf(support))
        # far upper tails underflow to exactly 0.0; dropping them keeps the convolutions short on real
        # models (thousands of neurons per layer) without changing any representable value
        pmf = np.trim_zeros(np.convolve(pmf, np.trim_zeros(layer_pmf, "b")), "b")
    return pmf


def overlap_pvalue_from_sizes(sizes_a: Sequence[int], sizes_b: Sequence[int], population: int,
                              observed: int) -> float:
    """P(total overlap >= observed) under the per-layer hypergeometric null."""
    if observed <= 0:
        return 1.0
    pmf = overlap_null_pmf(sizes_a, sizes_b, population)
    # summing the upper tail directly keeps small p-values exact (no 1 - cdf cancellation)
    return float(min(1.0, pmf[observed:].sum())) if observed < len(pmf) else 0.0


def expected_overlap(a: NeuronSet, b: NeuronSet) -> float:
    """Mean total overlap under the null: sum_l a_l b_l / N."""
    _check_comparable(a, b)
    n = a.intermediate_size
    return float(sum(x * y / n for x, y in zip(a.per_layer_counts(), b.per_layer_counts())))


@dataclass
class PairOverlap:
    """Overlap statistics of two named neuron sets."""

    a: str
    b: str
    size_a: int
    size_b: int
    intersection: int
    union: int
    jaccard: float
    overlap_coefficient: float
    expected_intersection: float
    p_value: float

    def to_row(self) -> dict:
        return dict(self.__dict__)


def pair_overlap(name_a: str, a: NeuronSet, name_b: str, b: NeuronSet) -> PairOverlap:
    _check_comparable(a, b, (name_a, name_b))
    pairs_a, pairs_b = a.as_pairs(), b.as_pairs()
    inter = len(pairs_a & pairs_b)
    return PairOverlap(
        a=name_a, b=name_b, size_a=len(pairs_a), size_b=len(pairs_b), intersection=inter,
        union=len(pairs_a | pairs_b), jaccard=jaccard(pairs_a, pairs_b),
        overlap_coefficient=overlap_coefficient(pairs_a, pairs_b), expected_intersection=expected_overlap(a, b),
        p_value=overlap_pvalue_from_sizes(a.per_layer_counts(), b.per_layer_counts(), a.intermediate_size, inter),
    )


@dataclass
class OverlapMatrix:
    """Pairwise overlap of a family of sets (e.g. all languages)."""

    names: list[str]
    pairs: dict[tuple[str, str], PairOverlap]  # (a, b) with a before b in `names`

    def get(self, a: str, b: str) -> PairOverlap:
        return self.pairs[(a, b)] if (a, b) in self.pairs else self.pairs[(b, a)]

    def values(self, metric: str) -> list[list[float]]:
        """Square matrix of one metric (jaccard, overlap_coefficient, intersection, p_value, ...); the diagonal
        is 1 for jaccard / overlap_coefficient and NaN otherwise."""
        out = []
        for a in self.names:
            row = []
            for b in self.names:
                if a == b:
                    row.append(1.0 if metric in ("jaccard", "overlap_coefficient") else float("nan"))
                else:
                    row.append(float(getattr(self.get(a, b), metric)))
            out.append(row)
        return out

    def rows(self) -> list[dict]:
        return [p.to_row() for p in self.pairs.values()]


def overlap_matrix(sets: Mapping[str, NeuronSet]) -> OverlapMatrix:
    """All pairwise overlaps among the named sets."""
    names = list(sets)
    pairs = {(a, b): pair_overlap(a, sets[a], b, sets[b]) for i, a in enumerate(names) for b in names[i + 1:]}
    return OverlapMatrix(names, pairs)


def split_named_sets(named: Mapping[str, NeuronSet]) -> tuple[dict[str, NeuronSet], dict[str, NeuronSet]]:
    """{"lang-en": s, "modality-text": t, ...} -> ({"en": s, ...}, {"text": t, ...})."""
    split: dict[str, dict[str, NeuronSet]] = {"language": {}, "modality": {}}
    for name, neuron_set in named.items():
        parsed = parse_group(name)
        if parsed is not None:
            split[parsed[0]][parsed[1]] = neuron_set
    return split["language"], split["modality"]


def shared_core(sets: Iterable[NeuronSet]) -> NeuronSet:
    """The neurons selected in every set (per-layer intersection), with the first set's metadata."""
    sets = list(sets)
    if not sets:
        raise ShieldError("shared core: no neuron sets given")
    first = sets[0]
    for other in sets[1:]:
        _check_comparable(first, other)
    layers = {}
    for layer in range(first.num_layers):
        common = set(first.indices(layer).tolist())
        for other in sets[1:]:
            common &= set(other.indices(layer).tolist())
        layers[layer] = torch.tensor(sorted(common), dtype=torch.int64)
    meta = {k: first.meta[k] for k in ("num_layers", "intermediate_size", "hidden_size", "model_type",
                                       "config_hash", "model") if k in first.meta}
    meta["num_layers"] = first.num_layers
    meta["derived"] = {"op": "intersection", "of": len(sets)}
    return NeuronSet(layers, meta)


def expected_core_size(sets: Sequence[NeuronSet]) -> float:
    """Mean size of the intersection of independent random sets with the same per-layer sizes:
    sum_l N * prod_i (c_il / N)."""
    if not sets:
        return 0.0
    n = sets[0].intermediate_size
    counts = np.array([s.per_layer_counts() for s in sets], dtype=float)
    return float((n * np.prod(counts / n, axis=0)).sum())


def per_layer_distribution(sets: Mapping[str, NeuronSet]) -> dict[str, list[int]]:
    """Selected neurons per decoder layer, per named set."""
    return {name: s.per_layer_counts() for name, s in sets.items()}
