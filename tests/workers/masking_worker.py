"""Distributed worker for tests/test_masking.py: masked / delta training of a tiny SwiGLU LM under
ZeRO-3 on CPU ranks, plus (on rank 0) a dense single-process plain-PyTorch reference.

Usage (through the deepspeed launcher): masking_worker.py --out DIR --variants mask-adamw,delta-sgd,...
A variant is MODE-OPT[-offload][-bf16][-install][-nomasker]: MODE mask|delta, OPT adamw|adaml2|sgdm|sgd.
-install lets DeepSpeed call the masker; -nomasker trains the frozen model without it (the trap).
Rank 0 writes DIR/<variant>.pt with the initial, final and reference states, dense masks and norms.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402

from shield_ds.process_group import init_distributed  # noqa: E402
from shield_ds.masking import (GradientMasker, attach_deltas, build_masks, delta_masks, freeze_unselected,  # noqa: E402
                               merge_deltas)
from shield_ds.models.adapters import FFNProjections  # noqa: E402
from shield_ds.neurons.neuron_set import NeuronSet  # noqa: E402

HIDDEN, INTERMEDIATE, VOCAB, LAYERS, SEQ, MICRO = 10, 14, 23, 3, 24, 2  # 140, 230: not divisible by 3
NEURONS = {0: [1, 5, 13], 1: [], 2: [0, 7]}
LR = {"adamw": 1e-2, "adaml2": 1e-2, "sgdm": 0.05, "sgd": 0.1}
WEIGHT_DECAY = {"adamw": 0.1, "adaml2": 0.1, "sgdm": 0.1, "sgd": 0.01}
CLIP = {"adamw": 0.02, "adaml2": 0.02, "sgdm": 0.02, "sgd": 0.0}  # 0.02: clipping is active


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.up_proj = nn.Linear(HIDDEN, INTERMEDIATE, bias=True)  # a row bias: entry i is neuron i's
        self.down_proj = nn.Linear(INTERMEDIATE, HIDDEN, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(HIDDEN, HIDDEN)
        self.mlp = MLP()

    def forward(self, h):
        h = h + torch.tanh(self.mix(h))
        return h + self.mlp(h)


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, ids):
        h = self.embed(ids[:, :-1])
        for layer in self.layers:
            h = layer(h)
        logits = self.head(h)
        return F.cross_entropy(logits.float().reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


class TinyAdapter:
    """The two adapter methods masking uses, for TinyLM."""

    def decoder_layers(self, model):
        return list(model.layers)

    def ffn(self, layer):
        mlp = layer.mlp
        return FFNProjections(rows={"gate_proj": mlp.gate_proj, "up_proj": mlp.up_proj}, down=mlp.down_proj)


def neuron_set() -> NeuronSet:
    return NeuronSet({k: torch.tensor(v, dtype=torch.int64) for k, v in NEURONS.items()},
                     {"num_layers": LAYERS, "intermediate_size": INTERMEDIATE, "hidden_size": HIDDEN})


def batch(step: int, micro: int, rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100_000 + 1000 * step + 10 * micro + rank)
    return torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=gen)


def make_model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM()


def dense_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Reference masks built the obvious way (full boolean tensors)."""
    masks = {}
    for layer_index, neurons in NEURONS.items():
        if not neurons:
            continue
        mlp = f"layers.{layer_index}.mlp"
        idx = torch.tensor(neurons)
        for name in ("gate_proj.weight", "up_proj.weight", "up_proj.bias", "down_proj.weight"):
            param = dict(model.named_parameters())[f"{mlp}.{name}"]
            mask = torch.zeros(param.shape, dtype=torch.bool)
            if name.startswith("down"):
                mask[:, idx] = True
            else:
                mask[idx] = True
            masks[f"{mlp}.{name}"] = mask
    return masks


def ds_config(opt: str, gas: int, offload: bool, bf16: bool) -> dict:
    params = {"lr": LR[opt], "weight_decay": WEIGHT_DECAY[opt]}
    if opt == "adamw":
        optimizer = {"type": "AdamW", "params": {**params, "torch_adam": True}}
    elif opt == "adaml2":
        optimizer = {"type": "Adam", "params": {**params, "torch_adam": True, "adam_w_mode": False}}
    elif opt == "sgdm":
        optimizer = {"type": "SGD", "params": {**params, "momentum": 0.9}}
    else:
        optimizer = {"type": "SGD", "params": params}
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": gas,
            "gradient_clipping": CLIP[opt], "zero_optimization": zero, "optimizer": optimizer,
            "bf16": {"enabled": bf16}, "zero_allow_untested_optimizer": True, "steps_per_print": 10_000, "wall_clock_breakdown": False}


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return {n: p.detach().clone() for n, p in model.named_parameters()}


def run_variant(variant: str, steps: int, gas: int) -> dict:
    parts = variant.split("-")
    mode, opt, flags = parts[0], parts[1], set(parts[2:])
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model = make_model()
    if "bf16" in flags:
        model = model.to(torch.bfloat16)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter, neurons = TinyAdapter(), neuron_set()
    if mode == "mask":
        freeze_unselected(model, adapter, neurons)
    else:
        attach_deltas(model, adapter, neurons)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable,
                                           config=ds_config(opt, gas, "offload" in flags, "bf16" in flags))
    if "nomasker" in flags:
        masker = None
    elif mode == "mask":
        masker = GradientMasker(engine, build_masks(engine.module, adapter, neurons))
    else:
        masker = GradientMasker(engine, delta_masks(engine.module))
    if "install" in flags:
        masker.install()
    manual = masker is not None and "install" not in flags
    masked_norms, ds_norms = [], []
    for step in range(steps):
        for micro in range(gas):
            ids = batch(step, micro, rank)
            loss = engine(ids)
            engine.backward(loss)
            if manual:
                applied = masker.apply()  # a no-op except at the accumulation boundary
                assert applied == (micro == gas - 1), (micro, applied)
            engine.step()  # DeepSpeed steps the optimizer only at the boundary
        masked_norms.append(masker.masked_grad_norm() if masker else None)
        ds_norms.append(float(engine.get_global_grad_norm()))
    if mode == "delta":
        merge_deltas(engine.module)
    final = full_state(engine.module)
    result = {"init": init, "final": final, "masked_norms": masked_norms, "ds_norms": ds_norms, "world": world,
              "clip": CLIP[opt], "neurons": NEURONS}
    if rank == 0 and not flags & {"bf16", "nomasker"}:
        result["reference"], result["reference_norms"] = reference(init, opt, world, steps, gas)
    result["masks"] = dense_masks(make_model())
    return result


def reference(init: dict, opt: str, world: int, steps: int, gas: int):
    """Single-process plain PyTorch with dense masks: mask, clip like DeepSpeed, decay inside the mask."""
    model = make_model()
    model.load_state_dict(init, strict=False)
    masks = dense_masks(model)
    named = dict(model.named_parameters())
    params = [named[n] for n in masks]
    lr, wd, clip = LR[opt], WEIGHT_DECAY[opt], CLIP[opt]
    if opt in ("adamw", "adaml2"):
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=0.0)
    else:
        optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9 if opt == "sgdm" else 0.0)
    norms = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=False)
        for rank in range(world):
            for micro in range(gas):
                (model(batch(step, micro, rank)) / (world * gas)).backward()
        with torch.no_grad():
            for name, mask in masks.items():
                named[name].grad.mul_(mask)
            norm = torch.sqrt(sum(named[n].grad.double().pow(2).sum() for n in masks)).item()
            norms.append(norm)
            if clip > 0:
                scale = max((norm + 1e-6) / clip, 1.0)
                for name in masks:
                    named[name].grad.div_(scale)
            for name, mask in masks.items():
                p = named[name]
                if opt == "adamw":
                    p.copy_(torch.where(mask, p * (1 - lr * wd), p))
                elif wd:
                    p.grad.add_(torch.where(mask, p, torch.zeros_like(p)), alpha=wd)
        optimizer.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, norms


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--variants", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--gas", type=int, default=2)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    init_distributed()  # the project's one init path (also unlinks DeepSpeed's CPU shm buffers)
    out = Path(args.out)
    for variant in args.variants.split(","):
        result = run_variant(variant, args.steps, args.gas)
        if torch.distributed.get_rank() == 0:
            out.mkdir(parents=True, exist_ok=True)
            torch.save(result, out / f"{variant}.pt")
    torch.distributed.barrier()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
