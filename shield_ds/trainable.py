"""What trains in each engine mode: freezing, delta slices, PEFT LoRA, every FFN matrix, everything.

`setup_trainable` is called by `ShieldEngine` on the loaded (ZeRO-3 partitioned) model before
deepspeed.initialize, so the optimizer only ever sees the trainable parameters. The export of the
LoRA and full-FFN arms (`ShieldTrainer`) uses `ffn_parameters`, `is_lora_layer` and `lora_delta`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from shield_ds.config import LORA_TARGETS
from shield_ds.dist import get_logger
from shield_ds.errors import ShieldError
from shield_ds.masking import attach_deltas, freeze_unselected

log = get_logger("train")


@dataclass(frozen=True)
class LoraSettings:
    """PEFT LoRA of the decoder-layer projections: a fixed `rank`, or the rank whose trainable parameter
    count is closest to `budget_params`; `alpha` defaults to 2 * rank."""

    rank: int | None = None
    budget_params: int | None = None
    targets: tuple[str, ...] = LORA_TARGETS
    alpha: float | None = None


def ffn_parameters(model: torch.nn.Module, adapter) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every FFN projection weight and bias of the language model's decoder layers."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for layer in adapter.decoder_layers(model):
        ffn = adapter.ffn(layer)
        for linear in (*ffn.rows.values(), ffn.down):
            out += [(names[id(p)], p) for p in (linear.weight, linear.bias) if p is not None]
    return out


def lora_targets(model: torch.nn.Module, adapter, targets: list[str] | tuple[str, ...]) -> list[tuple[str, torch.nn.Linear]]:
    """(qualified name, linear) of the decoder-layer projections named by `targets` (q or q_proj, ...).

    Only the language model's decoder layers are searched (never the vision tower); a target name
    that matches no projection there is a ShieldError.
    """
    wanted = {t if t.endswith("_proj") else f"{t}_proj" for t in targets}
    module_names = {id(m): n for n, m in model.named_modules()}
    found, seen = [], set()
    for layer in adapter.decoder_layers(model):
        for sub, module in layer.named_modules():
            leaf = sub.rsplit(".", 1)[-1]
            if leaf in wanted and isinstance(module, torch.nn.Linear):
                found.append((module_names[id(module)], module))
                seen.add(leaf)
    missing = sorted(wanted - seen)
    if missing:
        raise ShieldError(f"--lora-targets: no {', '.join(missing)} projection in the decoder layers of this "
                          f"{adapter.model_type} model")
    return found


def lora_delta(layer: torch.nn.Module, adapter_name: str = "default") -> torch.Tensor:
    """The weight change of a PEFT LoRA linear layer, scaling * B @ A, in float32 on the CPU
    (PEFT's get_delta_weight rounds to the adapter's dtype; merging adds this to the stored base weight)."""
    a = layer.lora_A[adapter_name].weight.detach().float().cpu()
    b = layer.lora_B[adapter_name].weight.detach().float().cpu()
    delta = b @ a
    return (delta.T if layer.fan_in_fan_out else delta) * float(layer.scaling[adapter_name])


def is_lora_layer(module: torch.nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def rank_for_budget(budget_params: int, params_per_rank: int) -> int:
    """The LoRA rank whose trainable parameter count is closest to `budget_params` (at least 1)."""
    return max(1, round(budget_params / params_per_rank))


def attach_lora(model: torch.nn.Module, adapter, settings: LoraSettings) -> dict[str, Any]:
    """Inject PEFT LoRA adapters into the decoder layers' target projections (only they train);
    returns what was attached (rank, alpha, targets, ...)."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = lora_targets(model, adapter, settings.targets)
    per_rank = sum(m.in_features + m.out_features for _, m in targets)
    if settings.budget_params is not None:
        rank = rank_for_budget(settings.budget_params, per_rank)
    elif settings.rank is not None:
        rank = int(settings.rank)
    else:
        raise ShieldError("LoRA needs a rank or a parameter budget")
    alpha = float(settings.alpha) if settings.alpha is not None else 2.0 * rank
    lora_config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                             target_modules=[name for name, _ in targets])
    inject_adapter_in_model(lora_config, model)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_A." in name or ".lora_B." in name)
    names = sorted({name.rsplit(".", 1)[-1] for name, _ in targets})
    budget = settings.budget_params
    log.info("lora: rank %d, alpha %g, %d projections (%s), %d trainable parameters%s", rank, alpha, len(targets),
             ",".join(names), rank * per_rank, f" (neuron budget {budget})" if budget is not None else "")
    return {"rank": rank, "alpha": alpha, "targets": names, "modules": len(targets), "budget_params": budget,
            "params_per_rank": per_rank}


def setup_trainable(model: torch.nn.Module, adapter, mode: str, neuron_set=None,
                    lora: LoraSettings | None = None) -> dict[str, Any] | None:
    """Freeze / wrap `model` for `mode` (before deepspeed.initialize); returns the LoRA settings in lora mode.

    mask: the FFN matrices holding selected neurons train (as neuron projections: sliced weight
    gradients), to be masked; delta: base frozen, slice parameters for the selected rows/columns;
    lora: PEFT LoRA (`lora`); full-ffn: every FFN matrix; full: every parameter (a benchmark baseline).
    """
    if mode in ("mask", "delta") and neuron_set is None:
        raise ShieldError(f"mode {mode} needs a neuron set")
    if mode == "mask":
        freeze_unselected(model, adapter, neuron_set)
        return None
    for p in model.parameters():
        p.requires_grad_(mode == "full")
    if mode == "delta":
        attach_deltas(model, adapter, neuron_set)
    elif mode == "full-ffn":
        for _, param in ffn_parameters(model, adapter):
            param.requires_grad_(True)
    elif mode == "lora":
        if lora is None:
            raise ShieldError("mode lora needs LoRA settings")
        return attach_lora(model, adapter, lora)
    elif mode != "full":
        raise ShieldError(f"unknown training mode {mode!r}")
    return None
