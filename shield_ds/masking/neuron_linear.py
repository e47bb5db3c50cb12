"""FFN projections that compute weight gradients for the selected neurons only (mask and delta mode).

A projection that holds selected neurons gets
- `shield_neurons` (int64 buffer): the selected neuron indices of its layer;
- `_shield_dim`: 0 for a row projection (gate_proj, up_proj: neuron i is row i and bias entry i),
  1 for down_proj (neuron i is column i; its bias belongs to no neuron);
- a forward that runs `NeuronLinear`, in place of `F.linear`.

Both training modes go through the same function, so they do the same arithmetic. The projection
runs on the weight as it is (in delta mode the frozen base, under ZeRO-3 the weight DeepSpeed's
hooks gathered) and only the selected slices are corrected; no copy of a weight matrix is made:
- rows (dim 0): y = F.linear(x, W, b), then y[..., S] = F.linear(x, slice, slice_bias);
- columns (dim 1): y = F.linear(x', W, b) + x[..., S] @ slice^T, where x' is x with the selected
  input channels set to zero, so the stored W[:, S] contributes exact zeros;
- input gradient: rows: g' @ W + g[..., S] @ slice (g' = g with the selected channels zeroed);
  columns: g @ W with columns S replaced by g @ slice;
- weight gradient: only the selected slice, from one small product (rows: g[:, S].T @ x, columns:
  g.T @ x[:, S]). Mask mode scatters it into a zero full-size gradient (everything else would be
  masked anyway), delta mode takes it as the slice parameter's gradient.

`slice` is delta mode's slice parameter, and in mask mode the selected rows/columns of the weight
itself (a [k, in] / [out, k] index_select of the gathered weight). What W holds at the selected
positions never reaches a result (overwritten, or multiplied by exact zeros), so mask and delta mode
compute bit-identical outputs and gradients whenever their selected values are equal: with an
elementwise optimizer (SGD, Adam without clipping) delta mode stays bit-identical to mask mode step
after step. That is why the slice parameters hold the selected rows/columns themselves, not a
difference (W + (D1 + D2) is not (W + D1) + D2 in floating point).

Cost against a stock linear: the small slice products, plus one transient copy of an activation
(x' in a down projection's forward, g' in a row projection's backward: tokens x intermediate) where
the previous version copied the whole weight in forward and again in backward. A down projection
keeps only x[..., S] for its backward, not x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NEURONS = "shield_neurons"
DIM = "_shield_dim"
SLICE = "shield_slice"
SLICE_BIAS = "shield_slice_bias"
_ORIGINAL_FORWARD = "_shield_original_forward"


def _selected(weight: torch.Tensor, bias: torch.Tensor | None, neurons: torch.Tensor, dim: int,
              slice_w: torch.Tensor | None, slice_b: torch.Tensor | None):
    """The selected slice and row bias the projection computes with, in the weight's dtype.

    Delta mode: its slice parameters; mask mode (slice_w None): the weight's own selected
    rows/columns (a small copy; the weight is gathered while the module runs under ZeRO-3).
    """
    if slice_w is None:
        piece = weight.index_select(dim, neurons)
        piece_b = bias.index_select(0, neurons) if dim == 0 and bias is not None else None
        return piece, piece_b
    piece = slice_w.to(weight.dtype)
    piece_b = slice_b.to(bias.dtype) if slice_b is not None else None
    return piece, piece_b


class NeuronLinear(torch.autograd.Function):
    """F.linear whose weight (and row-bias) gradient is computed for the selected neurons only.

    apply(x, weight, bias, neurons, dim, slice_w, slice_b): with slice_w None (mask mode) the
    gradient of `weight` is zero outside the selected slice; with slices (delta mode) they replace
    the selected slice of the frozen `weight`/`bias` and receive its gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, neurons, dim, slice_w, slice_b):
        piece, piece_b = _selected(weight, bias, neurons, dim, slice_w, slice_b)
        ctx.dim = dim
        if dim == 0:
            out = F.linear(x, weight, bias)
            out.index_copy_(-1, neurons, F.linear(x, piece, piece_b))
            saved_x = x
        else:
            saved_x = x.index_select(-1, neurons)
            out = F.linear(x.index_fill(-1, neurons, 0), weight, bias)
            out.add_(F.linear(saved_x, piece))
        ctx.save_for_backward(saved_x, weight, bias, neurons, slice_w, slice_b)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved_x, weight, bias, neurons, slice_w, slice_b = ctx.saved_tensors
        dim = ctx.dim
        need_x, need_w, need_b, _, _, need_sw, need_sb = ctx.needs_input_grad
        grad_x = grad_w = grad_b = grad_sw = grad_sb = None
        if need_x:
            piece, _ = _selected(weight, None, neurons, dim, slice_w, None)
            w, piece = weight.to(grad_out.dtype), piece.to(grad_out.dtype)
            if dim == 0:
                grad_x = grad_out.index_fill(-1, neurons, 0).matmul(w)
                grad_x.add_(grad_out.index_select(-1, neurons).matmul(piece))
            else:
                grad_x = grad_out.matmul(w)
                grad_x.index_copy_(-1, neurons, grad_out.matmul(piece))
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = saved_x.reshape(-1, saved_x.shape[-1]).to(g2.dtype)
        if need_w or need_sw:
            if dim == 0:
                piece = g2.index_select(1, neurons).t().matmul(x2)  # [k, in]
            else:
                piece = g2.t().matmul(x2)  # [out, k]: x2 holds the selected columns only
            if need_w:
                grad_w = torch.zeros_like(weight).index_copy_(dim, neurons, piece.to(weight.dtype))
            if need_sw:
                grad_sw = piece.to(slice_w.dtype)
        if need_b or need_sb:
            if dim == 0:
                piece_b = g2.index_select(1, neurons).sum(0)
                if need_b:
                    grad_b = torch.zeros_like(bias).index_copy_(0, neurons, piece_b.to(bias.dtype))
                if need_sb:
                    grad_sb = piece_b.to(slice_b.dtype)
            elif need_b:  # down_proj's bias belongs to no neuron: its true gradient
                grad_b = g2.sum(0).to(bias.dtype)
        return grad_x, grad_w, grad_b, None, None, grad_sw, grad_sb


def _neuron_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return NeuronLinear.apply(x, self.weight, self.bias, getattr(self, NEURONS), getattr(self, DIM),
                              getattr(self, SLICE, None), getattr(self, SLICE_BIAS, None))


def is_neuron_linear(module: nn.Module) -> bool:
    return hasattr(module, DIM)


def make_neuron_linear(linear: nn.Linear, neurons: torch.Tensor, dim: int) -> None:
    """Give `linear` the selected-neuron forward (call before deepspeed.initialize)."""
    if is_neuron_linear(linear):
        raise RuntimeError(f"{linear} is already a neuron projection")
    linear.register_buffer(NEURONS, neurons.clone().to(linear.weight.device), persistent=False)
    setattr(linear, DIM, dim)
    setattr(linear, _ORIGINAL_FORWARD, linear.__dict__.get("forward"))
    linear.forward = _neuron_forward.__get__(linear)


def restore_linear(linear: nn.Linear) -> None:
    """Undo `make_neuron_linear` (slice parameters are the caller's business)."""
    original = linear.__dict__.pop(_ORIGINAL_FORWARD, None)
    if original is None:
        del linear.forward
    else:
        linear.forward = original
    linear._buffers.pop(NEURONS, None)
    delattr(linear, DIM)


def neuron_projections(model: nn.Module, adapter, neuron_set) -> list[tuple[nn.Linear, torch.Tensor, int]]:
    """(projection, selected neuron indices, dim) for every FFN projection of a layer with selected neurons."""
    out = []
    for layer_index, layer in enumerate(adapter.decoder_layers(model)):
        neurons = neuron_set.indices(layer_index)
        if neurons.numel() == 0:
            continue
        ffn = adapter.ffn(layer)
        out.extend((linear, neurons, 0) for linear in ffn.rows.values())
        out.append((ffn.down, neurons, 1))
    return out
