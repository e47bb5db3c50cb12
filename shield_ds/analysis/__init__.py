"""Analysis of safety neurons: overlaps and their p-values, shared cores, per-layer distributions, plots."""

from shield_ds.analysis.overlap import (OverlapMatrix, PairOverlap, expected_core_size, expected_overlap, jaccard,
                                        overlap_coefficient, overlap_matrix, overlap_null_pmf,
                                        overlap_pvalue_from_sizes, pair_overlap, per_layer_distribution, shared_core,
                                        split_named_sets)
from shield_ds.analysis.report import analyze_identify_dir, render_markdown

__all__ = ["OverlapMatrix", "PairOverlap", "expected_core_size", "expected_overlap", "jaccard", "overlap_coefficient",
           "overlap_matrix", "overlap_null_pmf", "overlap_pvalue_from_sizes", "pair_overlap",
           "per_layer_distribution", "shared_core", "split_named_sets", "analyze_identify_dir", "render_markdown"]
