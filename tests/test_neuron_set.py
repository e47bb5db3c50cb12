"""The NeuronSet file: round trip, validation, refusal of sets from other models, selection arithmetic."""

from __future__ import annotations

import json

import pytest
import torch

from shield_ds.errors import ShieldError
from shield_ds.neurons import NeuronSet
from shield_ds.neurons.selection import cap_by_param_fraction, select_per_layer, top_k
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
    capped = cap_by_param_fraction(selected, harmful, params_per_neuron=10, total_params=100, max_fraction=0.3)
    # budget 3 neurons: scores 8 (0,1), 7 (0,2), 7 (1,3) kept, 6 (1,2) dropped; ties go to the lower layer
    assert capped[0].tolist() == [1, 2] and capped[1].tolist() == [3]
    assert cap_by_param_fraction(selected, harmful, 10, 100, 0.0) is selected


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
