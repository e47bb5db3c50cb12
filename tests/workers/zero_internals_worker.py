"""Worker for tests/test_zero_internals.py: a real one-rank ZeRO-3 engine built through
`ShieldEngine.load` (full-ffn mode, tiny checkpoint: no GradientMasker, so nothing reads the internals
before the checks do), then every DeepSpeed internal that
`shield_ds.zero_internals` relies on is checked. Writes the problems found (one line each, naming the
DeepSpeed version and the field) as JSON to --out; an empty list means all is where it should be.

    python tests/workers/zero_internals_worker.py --model DIR --out problems.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402

from shield_ds import zero_internals as zi  # noqa: E402
from shield_ds.data import SafetyCollator, SafetyRecord  # noqa: E402
from shield_ds.engine import ShieldEngine, resolve_ds_config  # noqa: E402
from shield_ds.process_group import exit_distributed, init_distributed  # noqa: E402

problems: list[str] = []


def check(ok: bool, field: str, what: str) -> bool:
    if not ok:
        problems.append(f"deepspeed {deepspeed.__version__}: {field}: {what}")
    return ok


def check_attr(obj, name: str, kind, owner: str):
    """obj.name exists and is a `kind`; returns it (None when missing)."""
    field = f"{owner}.{name}"
    if not check(hasattr(obj, name), field, f"missing on {type(obj).__name__}"):
        return None
    value = getattr(obj, name)
    check(isinstance(value, kind), field, f"is {type(value).__name__}, expected {getattr(kind, '__name__', kind)}")
    return value


def check_params(module: torch.nn.Module) -> None:
    for name, param in module.named_parameters():
        owner = f"parameter {name}"
        if not check(zi.is_partitioned(param), f"{owner}.ds_id/ds_numel", "not set: not a ZeRO-3 parameter"):
            return
        check_attr(param, "ds_id", int, owner)
        numel = check_attr(param, "ds_numel", int, owner)
        shape = check_attr(param, "ds_shape", (tuple, torch.Size), owner)
        if numel is not None and shape is not None:
            check(torch.Size(shape).numel() == numel, f"{owner}.ds_shape", f"{tuple(shape)} does not hold {numel}")
        partition = check_attr(param, "ds_tensor", torch.Tensor, owner)
        if partition is not None:
            local = check_attr(partition, "ds_numel", int, f"{owner}.ds_tensor")
            check(local is not None and 1 <= local <= (numel or 0), f"{owner}.ds_tensor.ds_numel",
                  f"{local} for a parameter of {numel}")
        check_attr(param, "ds_persist", bool, owner)
        check(hasattr(param, "ds_process_group"), f"{owner}.ds_process_group", "missing")


def check_optimizer(engine: ShieldEngine) -> None:
    zero = zi.zero3_optimizer(engine.ds)
    if not check(zero is not None, "engine.optimizer.fp32_partitioned_groups_flat",
                 f"the stage-3 optimizer ({type(engine.ds.optimizer).__name__}) has no such field"):
        return
    owner = type(zero).__name__
    check_attr(zero, "optimizer", torch.optim.Optimizer, owner)
    backup = getattr(zero, "backup_optimizer", None)
    check(backup is None or isinstance(backup, torch.optim.Optimizer), f"{owner}.backup_optimizer",
          f"is {type(backup).__name__}, expected None or an Optimizer")
    groups = check_attr(zero, "fp16_groups", list, owner)
    flats = check_attr(zero, "fp32_partitioned_groups_flat", list, owner)
    check_attr(zero, "grad_position", dict, owner)
    check(callable(getattr(zero, "get_param_id", None)), f"{owner}.get_param_id", "missing or not callable")
    check(callable(getattr(zero, "step", None)), f"{owner}.step", "missing or not callable")
    check(isinstance(zi.loss_scale(zero), float), f"{owner}.loss_scale", "not a number")
    if groups is None or flats is None:
        return
    check(len(groups) == len(flats) > 0, f"{owner}.fp16_groups / fp32_partitioned_groups_flat",
          f"{len(groups)} parameter groups for {len(flats)} flat partitions")
    for params, flat in zi.subgroups(zero):
        check(isinstance(flat, torch.Tensor) and flat.dim() == 1 and flat.dtype == torch.float32,
              f"{owner}.fp32_partitioned_groups_flat[i]", f"expected a 1-d fp32 tensor, got {flat!r:.60}")
        end = 0
        for param in params:
            try:
                offset = zi.grad_offset(zero, param)
            except Exception as exc:  # noqa: BLE001 - any failure here is the finding
                check(False, f"{owner}.grad_position[get_param_id(p)]", f"{type(exc).__name__}: {exc}")
                return
            end = max(end, offset + (zi.partition_numel(param) or 0))
        check(end <= flat.numel(), f"{owner}.grad_position", f"offsets reach {end} in a flat partition of "
                                                              f"{flat.numel()}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args()
    init_distributed()
    ds_config = resolve_ds_config("zero3_fp32.json", micro_batch_size=2,
                                  overrides={"zero_optimization.stage3_param_persistence_threshold": 0})
    engine = ShieldEngine.load(args.model, ds_config, mode="full-ffn")
    check_params(engine.module)
    check_optimizer(engine)
    if problems:  # the step below would only fail on the same fields
        args.out.write_text(json.dumps(problems, indent=1) + "\n", encoding="utf-8")
        exit_distributed(0)

    # One masked step through wrap_step: the optimizer's step must be the attribute DeepSpeed calls.
    records = [SafetyRecord(id=f"r{i}", prompt=f"question {i}", language="en", label="benign", response="answer")
               for i in range(2)]
    batch = SafetyCollator(engine.loaded.processor, engine.loaded.adapter, train=True, max_length=64)(records)
    zero = zi.zero3_optimizer(engine.ds)
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    grads: list[torch.Tensor | None] = []
    calls = []

    def before() -> None:
        calls.append(1)
        grads.extend(zi.local_grad(param) for param in trainable)

    original = zi.wrap_step(zero, before)
    engine.train_step(batch.to(engine.device, float_dtype=torch.float32))
    zi.unwrap_step(zero, original)
    check(calls == [1], f"{type(zero).__name__}.step", "a replaced step was not called by engine.step()")
    check(len(grads) == len(trainable) > 0, "deepspeed.utils.safe_get_local_grad", "no gradient partitions read")
    for param, grad in zip(trainable, grads):
        check(isinstance(grad, torch.Tensor) and grad.numel() == zi.partition_numel(param),
              "deepspeed.utils.safe_get_local_grad", f"gave {grad!r:.40} for a partition of "
                                                     f"{zi.partition_numel(param)}")
    check(len(zi.optimizer_state_tensors(engine.ds)) > len(zero.fp32_partitioned_groups_flat),
          f"{type(zero).__name__}.optimizer.state", "no optimizer state after a step")
    args.out.write_text(json.dumps(problems, indent=1) + "\n", encoding="utf-8")
    exit_distributed(0)


if __name__ == "__main__":
    main()
