"""Masking room: partition arithmetic, PartitionMask, delta parameters, and masked ZeRO-3 training
on 2 and 3 CPU ranks (tests/workers/masking_worker.py) against a dense plain-PyTorch reference."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import run_deepspeed
from shield_ds.masking import (PartitionMask, attach_deltas, build_masks, delta_state, freeze_unselected,
                               merge_deltas, param_partition, partition_range, partition_size)
from shield_ds.models.adapters import FFNProjections
from shield_ds.neurons.neuron_set import NeuronSet

WORKER = Path(__file__).parent / "workers" / "masking_worker.py"


# ---- arithmetic -------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_partition_ranges_tile_the_parameter(world):
    for numel in [1, 2, 3, 5, 7, 140, 230, 1001] + random.Random(world).sample(range(1, 5000), 20):
        size = partition_size(numel, world)
        assert size * world >= numel > (size - 1) * world
        ranges = [partition_range(numel, world, r) for r in range(world)]
        covered = [i for start, end in ranges for i in range(start, end)]
        assert covered == list(range(numel))
        assert all(end - start <= size for start, end in ranges)


def _dense_local(dense: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    start, end = partition_range(dense.numel(), world, rank)
    return torch.nonzero(dense.flatten()[start:end]).flatten()


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_partition_mask_matches_dense_reference(world):
    gen = random.Random(100 + world)
    for _ in range(25):
        rows, cols = gen.randint(1, 17), gen.randint(1, 13)
        pick_rows = sorted(gen.sample(range(rows), gen.randint(0, rows)))
        pick_cols = sorted(gen.sample(range(cols), gen.randint(0, cols)))
        dense_rows = torch.zeros(rows, cols, dtype=torch.bool)
        dense_rows[pick_rows] = True
        dense_cols = torch.zeros(rows, cols, dtype=torch.bool)
        dense_cols[:, pick_cols] = True
        dense_vec = torch.zeros(rows, dtype=torch.bool)
        dense_vec[pick_rows] = True
        for rank in range(world):
            cases = [(PartitionMask.for_rows((rows, cols), pick_rows, world, rank), dense_rows),
                     (PartitionMask.for_cols((rows, cols), pick_cols, world, rank), dense_cols),
                     (PartitionMask.for_rows((rows,), pick_rows, world, rank), dense_vec)]
            for mask, dense in cases:
                assert torch.equal(mask.local, _dense_local(dense, world, rank))
                # apply_ on a padded local partition keeps exactly the dense-mask entries
                size = partition_size(dense.numel(), world)
                start, end = partition_range(dense.numel(), world, rank)
                local = torch.randn(size)
                expected = torch.zeros(size)
                expected[: end - start] = local[: end - start] * dense.flatten()[start:end]
                assert torch.equal(mask.apply_(local.clone()), expected)


def test_partition_mask_rejects_bad_input():
    with pytest.raises(ValueError):
        PartitionMask.for_rows((4, 3), [4], 2, 0)
    with pytest.raises(ValueError):
        PartitionMask.for_cols((4, 3), [-1], 2, 0)
    with pytest.raises(ValueError):
        PartitionMask.for_rows((4, 3), [1], 2, 0).apply_(torch.zeros(5))


# ---- plain-module helpers ---------------------------------------------------------------------
class _MLP(nn.Module):
    def __init__(self, hidden=6, inter=9, bias=False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Layer(nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.norm = nn.LayerNorm(6)
        self.mlp = _MLP(bias=bias)

    def forward(self, h):
        return h + self.mlp(self.norm(h))


class _Model(nn.Module):
    def __init__(self, bias=False):
        super().__init__()
        torch.manual_seed(1)
        self.layers = nn.ModuleList(_Layer(bias) for _ in range(3))
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class _Adapter:
    def decoder_layers(self, model):
        return list(model.layers)

    def ffn(self, layer):
        return FFNProjections(rows={"gate_proj": layer.mlp.gate_proj, "up_proj": layer.mlp.up_proj},
                              down=layer.mlp.down_proj)


def _neurons() -> NeuronSet:
    return NeuronSet({0: torch.tensor([2, 8]), 1: torch.tensor([], dtype=torch.int64), 2: torch.tensor([0, 3, 4])},
                     {"num_layers": 3, "intermediate_size": 9, "hidden_size": 6})


def test_freeze_unselected_and_build_masks_on_plain_model():
    model = _Model(bias=True)
    names = freeze_unselected(model, _Adapter(), _neurons())
    expected = {f"layers.{i}.mlp.{p}" for i in (0, 2) for p in
                ("gate_proj.weight", "gate_proj.bias", "up_proj.weight", "up_proj.bias", "down_proj.weight")}
    assert set(names) == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    masks = build_masks(model, _Adapter(), _neurons())
    assert set(masks) == expected
    assert param_partition(model.head.weight) == (1, 0, 24, 24)
    assert masks["layers.2.mlp.down_proj.weight"].count == 6 * 3
    assert masks["layers.0.mlp.gate_proj.weight"].local.tolist() == list(range(12, 18)) + list(range(48, 54))


@pytest.mark.parametrize("bias", [False, True])
def test_delta_forward_merge_and_state(bias):
    x = torch.randn(2, 5, 6)
    model = _Model(bias=bias)
    base_out = model(x)
    names = attach_deltas(model, _Adapter(), _neurons())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)
    assert len(names) == 2 * (3 + (2 if bias else 0))
    # the slices start as the base's rows/columns; the frozen product plus the slice correction
    # equals the stock product up to float32 rounding (a split sum in the down projection)
    torch.testing.assert_close(model(x), base_out, rtol=1e-6, atol=1e-6)
    torch.manual_seed(3)
    with torch.no_grad():
        for name in names:
            dict(model.named_parameters())[name].normal_()
    delta_out = model(x)
    # the same slices written into the weights by hand
    reference = _Model(bias=bias)
    with torch.no_grad():
        for i in (0, 2):
            idx = _neurons().indices(i)
            src, dst = model.layers[i].mlp, reference.layers[i].mlp
            for proj in ("gate_proj", "up_proj"):
                getattr(dst, proj).weight[idx] = getattr(src, proj).shield_slice
                if bias:
                    getattr(dst, proj).bias[idx] = getattr(src, proj).shield_slice_bias
            dst.down_proj.weight[:, idx] = src.down_proj.shield_slice
    torch.testing.assert_close(delta_out, reference(x), rtol=1e-6, atol=1e-6)
    # ... and bit-identical to mask mode on those weights (the same arithmetic)
    masked = _Model(bias=bias)
    masked.load_state_dict(reference.state_dict())
    freeze_unselected(masked, _Adapter(), _neurons())
    assert torch.equal(delta_out, masked(x))
    state = delta_state(model)
    assert torch.equal(state["layers.2.mlp.gate_proj.shield_neurons"], torch.tensor([0, 3, 4]))
    assert state["layers.2.mlp.down_proj.shield_slice"].shape == (6, 3)
    assert merge_deltas(model) == 6
    assert not any("shield" in n for n, _ in model.named_parameters())
    assert not any("shield" in n for n, _ in model.named_buffers())
    assert not any("forward" in vars(m) for m in model.modules())  # stock nn.Linear forward again
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)
    torch.testing.assert_close(model(x), delta_out, rtol=1e-6, atol=1e-6)


def _selected(name: str, shape) -> torch.Tensor:
    """Dense mask of the selected entries of parameter `name` of _Model (for _neurons())."""
    mask = torch.zeros(shape, dtype=torch.bool)
    layer = int(name.split(".")[1])
    idx = _neurons().indices(layer)
    if "down_proj.weight" in name:
        mask[:, idx] = True
    elif "down_proj" not in name:
        mask[idx] = True
    return mask


@pytest.mark.parametrize("bias", [False, True])
def test_sliced_weight_gradient_is_the_selected_slice_of_the_true_gradient(bias):
    x = torch.randn(3, 7, 6, dtype=torch.float64)
    stock = _Model(bias=bias).double()
    freeze_unselected(stock, _Adapter(), _neurons(), sliced_grad=False)
    stock(x).square().sum().backward()
    sliced = _Model(bias=bias).double()
    freeze_unselected(sliced, _Adapter(), _neurons())
    sliced(x).square().sum().backward()
    grads = {n: p.grad for n, p in sliced.named_parameters() if p.requires_grad}
    assert grads
    for name, param in stock.named_parameters():
        if not param.requires_grad:
            continue
        inside = _selected(name, param.shape)
        assert inside.any() and not inside.all()
        torch.testing.assert_close(grads[name][inside], param.grad[inside], rtol=1e-12, atol=1e-12)
        assert not grads[name][~inside].any(), name  # nothing computed for the frozen rest


@pytest.mark.parametrize("bias", [False, True])
def test_delta_mode_is_bit_identical_to_mask_mode_under_sgd_on_one_process(bias):
    """Same arithmetic in both modes: 5 SGD steps (lr 0.1, momentum) leave bit-identical weights."""
    masked, delta = _Model(bias=bias), _Model(bias=bias)
    freeze_unselected(masked, _Adapter(), _neurons())
    attach_deltas(delta, _Adapter(), _neurons())
    opt_m = torch.optim.SGD([p for p in masked.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    opt_d = torch.optim.SGD([p for p in delta.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(5)
    for _ in range(5):
        x = torch.randn(4, 9, 6, generator=gen)
        for model, opt in ((masked, opt_m), (delta, opt_d)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        assert torch.equal(masked(x), delta(x))
    merge_deltas(delta)
    moved = 0
    for (name, a), b in zip(masked.named_parameters(), delta.parameters()):
        assert torch.equal(a, b), name
        moved += int((a != _Model(bias=bias).state_dict()[name]).sum())
    assert moved > 0


@pytest.mark.parametrize("mode", ["delta", "mask"])
def test_neuron_projections_make_no_weight_sized_copy(mode):
    """Forward and backward allocate no tensor of a FFN weight's size, except mask mode's weight gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Allocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen: list[tuple[str, tuple[int, ...]]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(tensor, torch.Tensor) and not func.is_view:
                    self.seen.append((func.__name__, tuple(tensor.shape)))
            return out

    model = _Model(bias=True)
    (attach_deltas if mode == "delta" else freeze_unselected)(model, _Adapter(), _neurons())
    x = torch.randn(2, 5, 6)  # 10 tokens: no activation has a weight's shape
    with Allocations() as allocations:
        model(x).square().sum().backward()
    weight_sized = [(name, shape) for name, shape in allocations.seen if shape in ((9, 6), (6, 9))]
    if mode == "delta":
        assert weight_sized == []
    else:  # the full-size weight gradient ZeRO-3 expects, one per trainable FFN weight (2 layers x 3)
        assert sorted({name for name, _ in weight_sized}) == ["index_copy_.default", "zeros_like.default"]
        assert len(weight_sized) == 2 * 6


# ---- ZeRO-3 on CPU ranks ----------------------------------------------------------------------
W2_VARIANTS = ["mask-adamw", "delta-adamw", "mask-sgd", "delta-sgd"]
W3_VARIANTS = ["mask-adamw", "mask-adaml2", "mask-sgdm", "mask-sgd", "delta-sgd", "delta-adamw",
               "mask-adamw-offload-install", "mask-adamw-bf16", "delta-adamw-bf16", "mask-adamw-nomasker"]


def _launch(tmp_path_factory, world: int, variants: list[str]) -> dict[str, dict]:
    out = tmp_path_factory.mktemp(f"masking_w{world}")
    run_deepspeed(WORKER, ["--out", str(out), "--variants", ",".join(variants)], num_ranks=world, timeout=420)
    return {v: torch.load(out / f"{v}.pt", weights_only=False) for v in variants}


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return _launch(tmp_path_factory, 2, W2_VARIANTS)


@pytest.fixture(scope="module")
def world3(tmp_path_factory):
    return _launch(tmp_path_factory, 3, W3_VARIANTS)


def _outside_moved(result) -> int:
    moved = 0
    for name, init in result["init"].items():
        mask = result["masks"].get(name, torch.zeros(init.shape, dtype=torch.bool))
        moved += int((result["final"][name] != init)[~mask].sum())
    return moved


def _assert_selected_changed(result) -> None:
    for name, mask in result["masks"].items():
        changed = result["final"][name] != result["init"][name]
        layer = int(name.split(".")[1])
        for neuron in result["neurons"][layer]:
            piece = changed[:, neuron] if name.endswith("down_proj.weight") else changed[neuron]
            assert piece.any(), f"{name}: neuron {neuron} did not change"


def _max_rel(a: dict, b: dict) -> float:
    return max(float((a[n].float() - b[n].float()).abs().max() / b[n].float().abs().max()) for n in b)


def _check_run(results: dict[str, dict]) -> None:
    for variant, result in results.items():
        if "nomasker" in variant:
            continue
        assert _outside_moved(result) == 0, variant
        if "bf16" not in variant:
            _assert_selected_changed(result)
            assert _max_rel(result["final"], result["reference"]) < 1e-5, variant
            for ours, theirs in zip(result["masked_norms"], result["reference_norms"]):
                assert ours == pytest.approx(theirs, rel=1e-5), variant
        # DeepSpeed's own norm (the one it clips with) is the masked norm
        for ours, ds in zip(result["masked_norms"], result["ds_norms"]):
            assert ours == pytest.approx(ds, rel=1e-5), variant
        if result["clip"] > 0 and "bf16" not in variant:
            assert max(result["reference_norms"]) > result["clip"], f"{variant}: clipping never active"
    # delta mode == mask mode: bit-identical with SGD (3 steps x 2 micro-batches, lr 0.1, L2 decay);
    # within 1e-5 with AdamW (3 steps, decay, clipping: the clip coefficient comes from a norm summed
    # over differently laid-out partitions).
    sgd_mask, sgd_delta = results["mask-sgd"]["final"], results["delta-sgd"]["final"]
    assert set(sgd_mask) == set(sgd_delta)
    for name in sgd_mask:
        assert torch.equal(sgd_mask[name], sgd_delta[name]), name
    assert _max_rel(results["delta-adamw"]["final"], results["mask-adamw"]["final"]) < 1e-5


def test_zero3_two_ranks(world2):
    _check_run(world2)


def test_zero3_three_ranks(world3):
    _check_run(world3)


def test_without_masker_adamw_decay_moves_frozen_outside_entries(world3):
    """The trap the masker exists for: AdamW's decoupled decay moves zero-gradient weights."""
    assert _outside_moved(world3["mask-adamw-nomasker"]) > 600  # of 713 unselected entries in the trainable matrices


def test_offload_and_bf16_leave_outside_untouched(world3):
    assert _outside_moved(world3["mask-adamw-offload-install"]) == 0
    assert _outside_moved(world3["mask-adamw-bf16"]) == 0
    assert _outside_moved(world3["delta-adamw-bf16"]) == 0  # merged back into bf16 base weights
    for mode in ("mask", "delta"):
        result = world3[f"{mode}-adamw-bf16"]
        assert any(not torch.equal(result["final"][n], result["init"][n]) for n in result["masks"]), mode
    assert _max_rel(world3["mask-adamw-offload-install"]["final"], world3["mask-adamw"]["final"]) < 1e-5


def test_engine_rejects_an_unknown_mode_before_loading(tmp_path):
    from shield_ds.engine import ShieldEngine
    from shield_ds.errors import ShieldError

    # The checkpoint does not exist: the mode is checked first, so the error names the mode, not the path.
    with pytest.raises(ShieldError, match="engine mode must be one of .*not 'masks'"):
        ShieldEngine.load(tmp_path / "missing", None, mode="masks")
