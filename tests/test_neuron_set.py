"""The NeuronSet file: round trip, validation, refusal of sets from other models, selection arithmetic."""

from __future__ import annotations

import json

import pytest
import torch

from shield_ds.errors import ShieldError
from shield_ds.neurons import NeuronSet
from shield_ds.neurons.selection import cap_by_param_fraction, select_per_layer, top_k, within_layer_rank
from shield_ds.neurons.statistics import ActivationStatistics

META = {"num_layers": 3, "intermediate_size": 10, "hidden_size": 4, "config_hash": "a" * 64}


def test_round_trip_and_masks(tmp_path):
    ns = NeuronSet({0: torch.tensor([5, 1, 5]), 2: torch.tensor([9])}, dict(META, param_fraction=0.25))
    ns.save(tmp_path)
    back = NeuronSet.load(tmp_path)
    assert back.indices(0).tolist() == [1, 5] and back.indices(1).tolist() == [] and back.indices(2).tolist() == [9]
    assert back.count == 3 and back.param_fraction == 0.25 and back.per_layer_counts() == [2, 0, 1]
    assert back.mask(0).nonzero().flatten().tolist() == [1, 5]
    assert json.loads((tmp_path / "neurons.json").read_text())["per_layer"] == [2, 0, 1]


def test_out_of_range_and_mismatched_sets_are_refused(tmp_path):
    NeuronSet({0: torch.tensor([10])}, META).save(tmp_path / "bad")
    with pytest.raises(ShieldError, match="out of range"):
        NeuronSet.load(tmp_path / "bad")
    ns = NeuronSet({0: torch.tensor([3])}, META)
    with pytest.raises(ShieldError, match="another model"):
        ns.check_matches("b" * 64, 3, 10, 4)
    with pytest.raises(ShieldError, match="intermediate"):
        ns.check_matches("a" * 64, 3, 12, 4)
    ns.check_matches("a" * 64, 3, 10, 4)
    with pytest.raises(ShieldError, match="not found"):
        NeuronSet.load(tmp_path / "missing")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "neurons.safetensors").write_bytes(b"junk")
    (tmp_path / "corrupt" / "neurons.json").write_text(json.dumps(META))
    with pytest.raises(ShieldError, match="unreadable"):
        NeuronSet.load(tmp_path / "corrupt")


def test_selection_excludes_general_neurons_and_cap_keeps_best():
    harmful = torch.tensor([[9.0, 8.0, 7.0, 1.0, 0.0], [0.0, 5.0, 6.0, 7.0, 1.0]], dtype=torch.float64)
    benign = torch.tensor([[9.0, 0.0, 1.0, 2.0, 3.0], [5.0, 1.0, 0.0, 0.0, 9.0]], dtype=torch.float64)
    assert top_k(0.6, 5) == 3
    selected = select_per_layer(harmful, benign, 0.6)
    assert selected[0].tolist() == [1, 2]  # neuron 0 is also a top benign neuron: general-purpose, excluded
    assert selected[1].tolist() == [2, 3]  # benign top: 4, 0, 1
    capped = cap_by_param_fraction(selected, harmful, params_per_neuron=10, total_params=100, max_fraction=0.3,
                                   ranking="raw")
    # budget 3 neurons: scores 8 (0,1), 7 (0,2), 7 (1,3) kept, 6 (1,2) dropped; ties go to the lower layer
    assert capped[0].tolist() == [1, 2] and capped[1].tolist() == [3]
    # layer-normalized: within-layer ranks (0,1)=1, (0,2)=2, (1,3)=0, (1,2)=1; the rank-1 tie goes to the
    # higher score relative to the layer's mean |score|: (0,1) 8/5 = 1.6 > (1,2) 6/3.8, both fit the budget
    capped = cap_by_param_fraction(selected, harmful, params_per_neuron=10, total_params=100, max_fraction=0.3)
    assert capped[0].tolist() == [1] and capped[1].tolist() == [2, 3]
    capped = cap_by_param_fraction(selected, harmful, params_per_neuron=10, total_params=100, max_fraction=0.2)
    assert capped[0].tolist() == [1] and capped[1].tolist() == [3]
    assert cap_by_param_fraction(selected, harmful, 10, 100, 0.0) is selected
    with pytest.raises(ShieldError, match="cap-ranking"):
        cap_by_param_fraction(selected, harmful, 10, 100, 0.3, ranking="global")


def test_within_layer_rank_is_stable():
    scores = torch.tensor([[3.0, 5.0, 5.0, -1.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    assert within_layer_rank(scores).tolist() == [[2, 0, 1, 3], [0, 1, 2, 3]]


def test_layer_normalized_cap_spreads_over_layers_when_scale_grows_with_depth():
    """Scores whose scale grows 10x per layer: the raw ranking fills the budget from the deepest layers only."""
    gen = torch.Generator().manual_seed(0)
    layers, width, ratio = 6, 200, 0.05
    base = torch.rand(layers, width, generator=gen, dtype=torch.float64)
    depth = (10.0 ** torch.arange(layers, dtype=torch.float64)).unsqueeze(1)
    harmful, benign = base * depth, torch.rand(layers, width, generator=gen, dtype=torch.float64) * depth
    selected = select_per_layer(harmful, benign, ratio)
    candidates = [layer for layer, idx in selected.items() if idx.numel()]
    assert len(candidates) == layers
    budget = 3 * layers  # neurons; params_per_neuron 1, total 1000
    normalized = cap_by_param_fraction(selected, harmful, 1, 1000, budget / 1000)
    raw = cap_by_param_fraction(selected, harmful, 1, 1000, budget / 1000, ranking="raw")
    assert sum(v.numel() for v in normalized.values()) == sum(v.numel() for v in raw.values()) == budget
    assert all(normalized[layer].numel() >= 1 for layer in candidates)
    assert max(v.numel() for v in normalized.values()) - min(v.numel() for v in normalized.values()) <= 2
    assert all(raw[layer].numel() == 0 for layer in range(layers - 2))  # early layers left empty
    for layer, idx in normalized.items():  # survivors are each layer's best candidates
        assert set(idx.tolist()) <= set(selected[layer].tolist())
        best = sorted(selected[layer].tolist(), key=lambda i: -float(harmful[layer, i]))[:idx.numel()]
        assert sorted(best) == idx.tolist()


def test_statistics_count_only_masked_tokens():
    stats = ActivationStatistics(["g1", "g2"], num_layers=1, width=3)
    linear = torch.nn.Linear(3, 2)
    stats.attach([linear])
    x = torch.tensor([[[1.0, -2.0, 0.0], [3.0, 4.0, -1.0]], [[-5.0, 6.0, 2.0], [7.0, 8.0, 9.0]]])
    mask = torch.tensor([[True, True], [True, False]])
    stats.set_batch(mask, ["g1", "g2"])
    linear(x)
    stats.detach()
    assert stats.get("g1", "count")[0].tolist() == [2, 2, 2]
    assert stats.get("g1", "sum")[0].tolist() == [4.0, 2.0, -1.0]
    assert stats.get("g1", "sumsq")[0].tolist() == [10.0, 20.0, 1.0]
    assert stats.get("g1", "abssum")[0].tolist() == [4.0, 6.0, 1.0]
    assert stats.get("g1", "poscount")[0].tolist() == [2.0, 1.0, 0.0]
    assert stats.get("g2", "sum")[0].tolist() == [-5.0, 6.0, 2.0]  # the padded token is not counted


def test_summary_says_when_the_cap_is_not_reached():
    """4 neurons of 10 parameters each in 1000: a cap of 4% binds, a cap of 10% (10 neurons) is not reached."""
    from shield_ds.neurons.identify import format_summary

    meta = dict(META, ratio=0.05, params_per_neuron=10, total_params=1000, param_fraction=0.04)
    ns = {0: torch.tensor([1, 2]), 2: torch.tensor([3, 4])}
    assert "not reached" not in format_summary(NeuronSet(ns, dict(meta, max_param_fraction=0.04)))
    line = format_summary(NeuronSet(ns, dict(meta, max_param_fraction=0.1))).splitlines()[-1]
    assert line.startswith("the cap 0.1 is not reached: the per-layer top-0.05 selection has only these 4 candidates")
    assert "not reached" not in format_summary(NeuronSet(ns, dict(meta, max_param_fraction=0.0)))  # no cap
