"""Overlap statistics, hypergeometric p-values, shared cores, and recipes/analyze.py end to end."""

from __future__ import annotations

import csv
import itertools
import json
from math import comb

import pytest
import torch
from conftest import PYTHON, REPO, assert_one_line_error, run_cmd, timeout_above

from shield_ds.analysis.overlap import (expected_core_size, expected_overlap, jaccard, overlap_coefficient,
                                        overlap_matrix, overlap_null_pmf, pair_overlap,
                                        per_layer_distribution, shared_core, split_named_sets)
from shield_ds.errors import ShieldError
from shield_ds.neurons.neuron_set import NeuronSet

N = 10  # intermediate size of the hand-computed examples


def make_set(layers: list[list[int]], width: int = N) -> NeuronSet:
    meta = {"num_layers": len(layers), "intermediate_size": width, "hidden_size": 8, "model_type": "llama"}
    return NeuronSet({i: torch.tensor(idx, dtype=torch.int64) for i, idx in enumerate(layers)}, meta)


A = make_set([[0, 1, 2], [5, 6]])
B = make_set([[1, 2, 3, 4], [6]])


def hyper(k: int, marked: int, drawn: int, population: int = N) -> float:
    return comb(marked, k) * comb(population - marked, drawn - k) / comb(population, drawn)


def _pvalue(a, b) -> float:
    """The p-value of two sets' overlap, as the pair table reports it."""
    return pair_overlap("a", a, "b", b).p_value


def test_jaccard_and_overlap_coefficient_by_hand():
    # A ∩ B = {(0,1), (0,2), (1,6)}; |A| = |B| = 5; |A ∪ B| = 7
    assert jaccard(A, B) == pytest.approx(3 / 7)
    assert overlap_coefficient(A, B) == pytest.approx(3 / 5)
    assert jaccard(make_set([[], []]), make_set([[], []])) == 0.0
    assert overlap_coefficient(A, make_set([[], []])) == 0.0
    assert expected_overlap(A, B) == pytest.approx(3 * 4 / 10 + 2 * 1 / 10)


def test_pvalue_equals_hand_computed_hypergeometric_sum():
    # layer 0: sizes 3 and 4 of 10, layer 1: sizes 2 and 1 of 10; P(k0 + k1 >= 3)
    by_hand = sum(hyper(k0, 3, 4) * hyper(k1, 2, 1) for k0 in range(4) for k1 in range(2) if k0 + k1 >= 3)
    assert by_hand == pytest.approx(hyper(3, 3, 4) + hyper(2, 3, 4) * hyper(1, 2, 1))
    assert _pvalue(A, B) == pytest.approx(by_hand, abs=1e-12)
    # and by brute force over every random B of the same per-layer sizes
    pairs_a = A.as_pairs()
    hits = total = 0
    for l0 in itertools.combinations(range(N), 4):
        for l1 in itertools.combinations(range(N), 1):
            rand_b = {(0, i) for i in l0} | {(1, i) for i in l1}
            hits += len(pairs_a & rand_b) >= 3
            total += 1
    assert _pvalue(A, B) == pytest.approx(hits / total, abs=1e-12)


def test_null_pmf_is_a_distribution_and_tail_edges():
    pmf = overlap_null_pmf([3, 2], [4, 1], N)
    assert len(pmf) == 5 and pmf.sum() == pytest.approx(1.0)
    assert pmf[0] == pytest.approx(hyper(0, 3, 4) * hyper(0, 2, 1))
    assert _pvalue(A, make_set([[7, 8, 9], [0]])) == 1.0  # no overlap at all
    full = make_set([list(range(N)), []])
    assert _pvalue(full, full) == pytest.approx(1.0)  # a full layer always overlaps completely
    same = make_set([[0, 1], [2]])
    assert _pvalue(same, same) == pytest.approx(hyper(2, 2, 2) * hyper(1, 1, 1))


def test_pair_matrix_core_and_per_layer():
    c = make_set([[1, 2, 9], [6, 7]])
    matrix = overlap_matrix({"lang-en": A, "lang-zh": B, "lang-sw": c})
    assert matrix.names == ["lang-en", "lang-zh", "lang-sw"]
    assert matrix.get("lang-zh", "lang-en").intersection == 3
    values = matrix.values("jaccard")
    assert values[0][0] == 1.0 and values[0][1] == pytest.approx(3 / 7) and values[1][0] == values[0][1]
    assert pair_overlap("a", A, "c", c).jaccard == pytest.approx(3 / 7)  # {(0,1),(0,2),(1,6)} of 7
    core = shared_core([A, B, c])
    assert core.as_pairs() == {(0, 1), (0, 2), (1, 6)}
    assert core.intermediate_size == N and core.per_layer_counts() == [2, 1]
    assert expected_core_size([A, B, c]) == pytest.approx(N * (3 / N) * (4 / N) * (3 / N) + N * (2 / N) * (1 / N) * (2 / N))
    assert per_layer_distribution({"a": A, "b": B}) == {"a": [3, 2], "b": [4, 1]}
    langs, mods = split_named_sets({"lang-en": A, "modality-text": B, "other": c})
    assert list(langs) == ["en"] and list(mods) == ["text"]


def test_sets_from_different_models_are_refused():
    with pytest.raises(ShieldError, match="different model shapes"):
        _pvalue(A, make_set([[0], [1]], width=20))


# --- recipes/analyze.py ------------------------------------------------------------------------------

SPLIT = {"split": "train", "test_fraction": 0.3, "split_seed": 7, "prompt_keys": 40, "prompt_key_digest": "ab" * 32}


def write_identify_dir(root):
    langs = {"en": [[0, 1, 2, 3], [4, 5]], "zh": [[0, 1, 2, 8], [5, 6]], "sw": [[0, 1, 7], [5, 9, 10]]}
    mods = {"text": [[0, 1, 2], [4, 5]], "typographic": [[1, 2, 11], [5, 6, 7]]}
    width = 12
    union = [sorted({i for s in list(langs.values()) + list(mods.values()) for i in s[layer]}) for layer in range(2)]
    main = make_set(union, width)
    main.meta.update(SPLIT)  # what identify records about its data; analysis.json passes it on
    main.save(root)
    for name, layers in langs.items():
        make_set(layers, width).save(root / "sets" / f"lang-{name}")
    for name, layers in mods.items():
        make_set(layers, width).save(root / "sets" / f"modality-{name}")
    return langs, mods


def test_analyze_recipe_end_to_end(tmp_path):
    identify = tmp_path / "identify"
    write_identify_dir(identify)
    out = tmp_path / "report"
    proc = run_cmd([PYTHON, str(REPO / "recipes" / "analyze.py"), "--neurons", str(identify), "--out", str(out)],
                   timeout=300)
    assert "analysis.md" in proc.stdout
    names = {p.name for p in out.iterdir()}
    assert {"analysis.md", "analysis.json", "per_layer.csv", "per_layer.png", "per_layer_heatmap.png",
            "overlap_pairs.csv", "jaccard_languages.csv", "jaccard_languages.png", "jaccard_modalities.csv",
            "jaccard_modalities.png", "shared_core.csv", "shared_core"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    for png in ("per_layer.png", "jaccard_languages.png", "jaccard_modalities.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    core = NeuronSet.load(out / "shared_core")
    assert core.as_pairs() == {(0, 0), (0, 1), (1, 5)}  # in en, zh and sw
    with (out / "overlap_pairs.csv").open(encoding="utf-8") as handle:
        pairs = {(r["a"], r["b"]): r for r in csv.DictReader(handle)}
    assert len(pairs) == 10  # 5 named sets
    en_zh = pairs[("lang-en", "lang-zh")]
    assert en_zh["kind"] == "language" and int(en_zh["intersection"]) == 4 and int(en_zh["union"]) == 8
    assert float(en_zh["jaccard"]) == pytest.approx(0.5)
    p_hand = sum(hyper(k0, 4, 4, 12) * hyper(k1, 2, 2, 12) for k0 in range(5) for k1 in range(3) if k0 + k1 >= 4)
    assert float(en_zh["p_value"]) == pytest.approx(p_hand, rel=1e-9)
    assert pairs[("lang-en", "modality-text")]["kind"] == "cross"
    with (out / "per_layer.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["lang-sw"]) for r in rows] == [3, 3]
    summary = json.loads((out / "analysis.json").read_text(encoding="utf-8"))
    assert summary["shared_core"]["size"] == 3 and summary["families"]["modalities"]["pairs"] == 1
    assert {key: summary[key] for key in SPLIT} == SPLIT
    markdown = (out / "analysis.md").read_text(encoding="utf-8")
    assert "## Overlap across languages" in markdown and "## Shared core across languages" in markdown
    assert "Data: train split (test fraction 0.3, seed 7), 40 prompts, digest `abababababab`." in markdown
    assert "| lang-en | lang-zh | 6 | 6 | 4 | 1.7 | 0.500 | 0.667 |" in markdown
    # neurons per layer and set, in the set order of the table (selected, languages, modalities)
    assert "| layer | selected | lang-en | lang-zh | lang-sw | modality-text | modality-typographic |" in markdown
    assert "| 0 | 7 | 4 | 4 | 3 | 3 | 3 |" in markdown and "| 1 | 6 | 2 | 2 | 3 | 2 | 3 |" in markdown
    assert "| selected | 13 | 54.167% | 2 of 2 | 0 |" in markdown


@timeout_above(300, 300, 300)
def test_analyze_recipe_default_out_and_errors(tmp_path):
    identify = tmp_path / "identify"
    write_identify_dir(identify)
    run_cmd([PYTHON, str(REPO / "recipes" / "analyze.py"), "--neurons", str(identify)], timeout=300)
    assert (identify / "analysis" / "analysis.md").is_file()

    missing = tmp_path / "nowhere"
    proc = run_cmd([PYTHON, str(REPO / "recipes" / "analyze.py"), "--neurons", str(missing)], timeout=300, check=False)
    line = assert_one_line_error(proc, str(missing))
    assert line == f"error: {missing}: no such identify output directory"
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cmd([PYTHON, str(REPO / "recipes" / "analyze.py"), "--neurons", str(empty)], timeout=300, check=False)
    assert_one_line_error(proc, str(empty))
