"""Masked training under ZeRO-3: zero every gradient entry outside the selected neurons and take
weight decay away from the optimizer so that nothing outside the mask can move.

Order of one optimizer step (the training loop):

    for micro_batch in accumulation_window:
        loss = engine(**micro_batch).loss
        engine.backward(loss)
    masker.apply()     # at the boundary: ZeRO-3 has reduce-scattered the summed gradients into
                       # each rank's local partition; mask them there
    engine.step()      # DeepSpeed computes the (masked) global norm, clips, steps the optimizer

`masker.install()` makes DeepSpeed call `apply()` itself at the start of its optimizer step (still
before the norm and clipping), for loops that only call `engine.step()`.

Weight decay. AdamW's decoupled decay moves weights whose gradient is zero, and coupled L2 decay
(Adam with adam_w_mode false, SGD) writes `wd * p` into every gradient entry after our masking. We
therefore set `weight_decay` to 0 in the optimizer's param groups (the original value is kept in
the group under "shield_weight_decay", so it survives checkpoints) and apply it ourselves, only
inside the mask, from a step pre-hook of the basic optimizer. DeepSpeed runs that optimizer once per
ZeRO sub-group after unscaling and clipping, so the hook sees exactly what torch sees:
- decoupled (AdamW): p[mask] *= 1 - lr * wd before the update, as torch AdamW does;
- coupled (Adam L2, SGD): grad[mask] += wd * p[mask] after clipping, as torch Adam/SGD do.
Restoring masked-out entries after the step was rejected: it needs a copy of every trainable
partition (GBs at 70B) and would still leave AdamW's decay inside Adam's moment statistics.

With the decay taken over, entries outside the mask have zero gradient, zero Adam moments and zero
momentum, so every optimizer leaves them bit-identical.

Requirements: ZeRO stage 3, managed gradient accumulation (DeepSpeed's default), and a mask for
every trainable parameter (`freeze_unselected` before `deepspeed.initialize` guarantees it in mask
mode; `delta.delta_masks` provides full masks in delta mode).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from deepspeed.accelerator import get_accelerator

from shield_ds import dist, zero_internals as zi
from shield_ds.dist import get_logger
from shield_ds.errors import ShieldError
from shield_ds.masking.partition import param_partition
from shield_ds.masking.partition_mask import PartitionMask

log = get_logger("masking")

DECAY_KEY = "shield_weight_decay"


def decay_mode(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> str:
    """'decoupled' (AdamW), 'coupled' (L2 in the gradient: Adam, SGD) or 'unknown'."""
    if "decoupled_weight_decay" in group:  # torch Adam / AdamW
        return "decoupled" if group["decoupled_weight_decay"] else "coupled"
    if isinstance(optimizer, torch.optim.SGD):
        return "coupled"
    for attr in ("adam_w_mode", "adamw_mode"):  # DeepSpeed FusedAdam / DeepSpeedCPUAdam
        if hasattr(optimizer, attr):
            return "decoupled" if getattr(optimizer, attr) else "coupled"
    return "unknown"


class GradientMasker:
    """Applies `PartitionMask`s to a ZeRO-3 engine's gradient partitions and owns weight decay.

    `masks` maps parameter names of `engine.module` to their PartitionMask (from `build_masks`, or
    `delta_masks` in delta mode).
    """

    def __init__(self, engine, masks: dict[str, PartitionMask]):
        engine = getattr(engine, "ds", engine)  # a ShieldEngine or the DeepSpeedEngine itself
        self.engine = engine
        self.zero = zi.zero3_optimizer(engine)
        if self.zero is None:
            raise ShieldError("masked training needs ZeRO stage 3 (set zero_optimization.stage = 3)")
        managed = getattr(engine, "managed_gradient_accumulation", None)
        if managed is not None and not managed():
            raise ShieldError("masked training needs managed gradient accumulation (the DeepSpeed default)")
        params = dict(engine.module.named_parameters())
        missing = sorted(set(masks) - set(params))
        if missing:
            raise ShieldError(f"mask for unknown parameter {missing[0]!r}")
        unmasked = [n for n, p in params.items() if p.requires_grad and n not in masks]
        if unmasked:
            raise ShieldError(f"parameter {unmasked[0]!r} is trainable but has no mask "
                              f"({len(unmasked)} such); call freeze_unselected before deepspeed.initialize")
        self.entries: list[tuple[torch.nn.Parameter, PartitionMask]] = []
        for name, mask in masks.items():
            param = params[name]
            if not param.requires_grad:
                raise ShieldError(f"masked parameter {name!r} does not require grad")
            world, rank, numel, _ = param_partition(param)
            if (world, rank, numel) != (mask.world, mask.rank, mask.numel):
                raise ShieldError(f"mask of {name!r} was built for another partition layout")
            self.entries.append((param, mask))
        self._by_subgroup = self._index_subgroups()
        self._optimizers = zi.basic_optimizers(self.zero)
        self._take_over_weight_decay()
        self._hooks = [opt.register_step_pre_hook(self._before_optimizer_step) for opt in self._optimizers]
        self._installed = None
        self.last_norm: float | None = None
        self.group = self._norm_group()

    # ---- setup ------------------------------------------------------------------------------
    def _index_subgroups(self) -> dict[int, list]:
        """id(fp32 flat partition of a sub-group) -> [offsets of masked entries in it, one per parameter]."""
        mask_of = {id(p): m for p, m in self.entries}
        out: dict[int, list] = {}
        for group, flat in zi.subgroups(self.zero):
            for param in group:
                if id(param) not in mask_of:
                    continue
                out.setdefault(id(flat), []).append(mask_of[id(param)].local + zi.grad_offset(self.zero, param))
        return out

    def _take_over_weight_decay(self) -> None:
        self.decay: list[tuple[str, float]] = []
        for opt in self._optimizers:
            for group in opt.param_groups:
                wd = float(group.get(DECAY_KEY, group.get("weight_decay", 0.0)) or 0.0)
                group[DECAY_KEY] = wd
                if "weight_decay" in group:
                    group["weight_decay"] = 0.0
                mode = decay_mode(opt, group)
                if wd and mode == "unknown":
                    raise ShieldError(f"weight decay with optimizer {type(opt).__name__} is not supported in masked "
                                      f"training; set weight_decay to 0")
        first = self._optimizers[0].param_groups[0]
        log.info("masking: %d masked tensors, weight decay %s (%s) applied inside the mask only",
                 len(self.entries), first[DECAY_KEY], decay_mode(self._optimizers[0], first))

    def _norm_group(self):
        groups = {id(zi.process_group(p)): zi.process_group(p) for p, _ in self.entries}
        if len(groups) > 1:
            raise ShieldError("masked parameters live in different ZeRO process groups; not supported")
        return next(iter(groups.values()), None)

    # ---- the step -----------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, *, force: bool = False) -> bool:
        """Mask the gradient partitions; call after the last micro-batch's backward, before engine.step().

        A no-op (returns False) when the engine is not at a gradient-accumulation boundary.
        Collective: every rank must call it. Also computes `masked_grad_norm()`.
        """
        if not force and not self.engine.is_gradient_accumulation_boundary():
            return False
        device = get_accelerator().current_device_name()
        squares = torch.zeros((), dtype=torch.float64, device=device)
        for param, mask in self.entries:
            grad = zi.local_grad(param)
            if grad is None:
                continue
            mask.apply_(grad)
            zi.set_local_grad(param, grad)  # also refreshes the offload path's per-param norm
            # Only the masked entries can be non-zero: the norm needs them alone (no host sync per tensor).
            inside = grad.view(-1).index_select(0, mask.local.to(grad.device))
            squares += inside.double().pow(2).sum().to(device)
        dist.all_reduce(squares, group=self.group)
        squares = squares.cpu()
        self.last_norm = math.sqrt(float(squares)) / zi.loss_scale(self.zero)
        return True

    def masked_grad_norm(self) -> float | None:
        """L2 norm of the gradient inside the mask at the last `apply()` (before clipping, unscaled)."""
        return self.last_norm

    def install(self) -> None:
        """Make DeepSpeed call `apply()` at the start of every optimizer step (before norm and clipping)."""
        if self._installed is not None:
            return
        self._installed = zi.wrap_step(self.zero, lambda: self.apply(force=True))

    def remove(self) -> None:
        """Undo the hooks and give the weight decay back to the optimizer."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._installed is not None:
            zi.unwrap_step(self.zero, self._installed)
            self._installed = None
        for opt in self._optimizers:
            for group in opt.param_groups:
                if DECAY_KEY in group and "weight_decay" in group:
                    group["weight_decay"] = group.pop(DECAY_KEY)

    @torch.no_grad()
    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        """Step pre-hook of the basic optimizer (run per ZeRO sub-group, after unscale and clip)."""
        for group in optimizer.param_groups:
            wd = float(group.get(DECAY_KEY, 0.0))
            if not wd:
                continue
            lr = float(group["lr"])
            mode = decay_mode(optimizer, group)
            for flat in group["params"]:
                for offsets in self._by_subgroup.get(id(flat), ()):
                    offsets = offsets.to(flat.device)
                    values = flat.data.index_select(0, offsets)
                    if mode == "decoupled":  # torch AdamW: param.mul_(1 - lr * wd)
                        flat.data.index_copy_(0, offsets, values.mul_(1 - lr * wd))
                    else:  # torch Adam / SGD: grad = grad.add(param, alpha=wd), after DeepSpeed's clipping
                        grad = flat.grad.index_select(0, offsets).add_(values, alpha=wd)
                        flat.grad.index_copy_(0, offsets, grad)
