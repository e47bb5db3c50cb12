"""Stage 2: fine-tune only the safety neurons under ZeRO-3 (the `ShieldTrainer` recipe).

Mask mode (default): every parameter without a selected neuron is frozen before
deepspeed.initialize; the FFN matrices that hold selected neurons train with `PartitionMask`s
applied to each rank's gradient partition before the optimizer step (which also owns weight
decay), so nothing outside the selected rows/columns moves. Delta mode: base weights frozen,
small parameters hold the selected rows/columns (optimizer state for those alone). Both compute
weight gradients for the selected slices only, with the same arithmetic (`masking.neuron_linear`). Both export the same way: the changed
slices go into `shield_patch.safetensors`, which applied to the base checkpoint gives `model/`.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F

import shield_ds
from shield_ds import dist
from shield_ds.engine import ShieldEngine, config_dtype, gathered, resolve_ds_config, zero_stage
from shield_ds.errors import ShieldError
from shield_ds.io import read_jsonl, write_json, write_text

log = dist.get_logger("train")

BENIGN_TARGETS_FILE = "benign_targets.jsonl"
PATCH_FILE = "shield_patch.safetensors"


@dataclass
class TrainConfig:
    model: str
    neurons: str = "runs/identify"
    harmful: list[str] = field(default_factory=lambda: ["multijail"])
    benign: list[str] = field(default_factory=lambda: ["multiq"])
    languages: list[str] | None = None
    modalities: list[str] = field(default_factory=lambda: ["text"])
    image: str | None = None
    per_group_limit: int | None = None
    benign_targets: str = "none"  # "none": benign records need responses; "self": the base model answers
    refusals: str | None = None
    max_new_tokens: int = 32  # for --benign-targets self
    max_length: int | None = 1024
    update: str = "mask"  # "mask" | "delta"
    max_steps: int | None = None
    epochs: float = 1.0
    lr: float | None = None
    schedule: str = "constant"  # constant | linear | cosine
    warmup_steps: int = 0
    micro_batch_size: int = 4
    grad_accum: int = 1
    save_every: int = 0
    keep_last: int = 2
    resume: bool = False
    seed: int = 0
    out: str = "runs/train"
    ds_config: str = "ds_configs/zero3_bf16.json"
    ds_overrides: list[str] = field(default_factory=list)
    data_dir: str | None = None
    export: bool = True
    gradient_checkpointing: bool = False


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier of the base lr at optimizer step s (warmup, then constant/linear/cosine to 0)."""
    if schedule not in ("constant", "linear", "cosine"):
        raise ShieldError(f"unknown schedule {schedule!r} (expected constant, linear or cosine)")

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def response_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample fp32 sum of cross-entropy over response tokens and the number of those tokens ([B], [B])."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    token_loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                 ignore_index=-100, reduction="none").view(shift_labels.shape)
    return token_loss.sum(1), (shift_labels != -100).sum(1)


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample mean cross-entropy over response tokens ([B]); 0 for a sample without any."""
    total, counts = response_nll(logits, labels)
    return total / counts.clamp_min(1)


def _fault_injection(step: int, boundary_next: bool) -> None:
    """Testing aid: SHIELD_DS_FAULT_KILL="RANK:STEP" SIGKILLs rank RANK during optimizer step STEP+1
    (after its backward, before the optimizer step), like a node dying mid-run."""
    spec = os.environ.get("SHIELD_DS_FAULT_KILL")
    if not spec or not boundary_next:
        return
    rank, at = (int(x) for x in spec.split(":"))
    if dist.rank() == rank and step == at:
        import signal

        log.warning("fault injection: SIGKILL rank %d during step %d", rank, step + 1)
        os.kill(os.getpid(), signal.SIGKILL)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


class ShieldTrainer:
    """Validates everything, loads the model partitioned, trains the masked neurons, exports."""

    def __init__(self, cfg: TrainConfig):
        if cfg.update not in ("mask", "delta"):
            raise ShieldError(f"--update must be 'mask' or 'delta', not {cfg.update!r}")
        if cfg.benign_targets not in ("none", "self"):
            raise ShieldError(f"--benign-targets must be 'none' or 'self', not {cfg.benign_targets!r}")
        self.cfg = cfg
        self.out = Path(cfg.out)

    # --- preparation (no output is written until all of it passed) -------------------------------
    def prepare(self) -> None:
        from shield_ds.data import load_labeled
        from shield_ds.data.targets import check_targets, load_refusals, with_refusals
        from shield_ds.models import config_hash, get_adapter, load_config
        from shield_ds.neurons import NeuronSet

        cfg = self.cfg
        self.config = load_config(cfg.model)
        self.adapter = get_adapter(self.config)
        self.config_hash = config_hash(self.config)
        self.neuron_set = NeuronSet.load(cfg.neurons)
        self.neuron_set.check_matches(self.config_hash, self.adapter.num_layers(self.config),
                                      self.adapter.intermediate_size(self.config), self.adapter.hidden_size(self.config),
                                      where=f"neuron set {cfg.neurons}", model=str(cfg.model))
        if self.neuron_set.count == 0:
            raise ShieldError(f"neuron set {cfg.neurons} selects no neurons: nothing to train")
        records = load_labeled(cfg.harmful, cfg.benign, modalities=cfg.modalities, languages=cfg.languages,
                               image=cfg.image, per_group_limit=cfg.per_group_limit, seed=cfg.seed,
                               data_dir=cfg.data_dir, require=())
        if not records:
            raise ShieldError("empty training set: no records for the requested languages and modalities")
        records = self._drop_overlong(with_refusals(records, load_refusals(cfg.refusals)))
        self.needs_self_targets = [r for r in records if not r.response]
        if cfg.benign_targets != "self":
            check_targets(records)
        self.records = records

    def _drop_overlong(self, records: list) -> list:
        """Leave out records whose prompt alone fills --max-length (they would teach nothing)."""
        if self.cfg.max_length is None:
            return records
        from shield_ds.models import load_processor

        processor = load_processor(self.cfg.model)
        tokenizer = getattr(processor, "tokenizer", processor)
        kept = []
        for r in records:
            text = self.adapter.chat_prompt(processor, r.prompt, r.has_image)
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) < self.cfg.max_length:
                kept.append(r)
        if len(kept) < len(records):
            log.warning("left out %d of %d records whose prompt is longer than --max-length %d",
                        len(records) - len(kept), len(records), self.cfg.max_length)
        return kept

    # --- main ----------------------------------------------------------------------------------
    def run(self) -> None:
        from shield_ds.launch.preemption import REQUEUE_EXIT_CODE, PreemptionHandler, mark_for_requeue

        # Installed first: a pre-timeout or preemption signal that arrives while the model loads (minutes
        # at 70B) must stop the run at its first step, not kill the rank (the default action of SIGUSR1).
        preemption = PreemptionHandler()
        self.prepare()
        cfg = self.cfg
        from shield_ds.masking import (GradientMasker, attach_deltas, build_masks, delta_masks,
                                       freeze_unselected)
        from shield_ds.models import count_parameters, load_model

        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.ds_config = resolve_ds_config(cfg.ds_config, micro_batch_size=cfg.micro_batch_size,
                                           grad_accum=cfg.grad_accum, lr=cfg.lr, overrides=cfg.ds_overrides)
        if zero_stage(self.ds_config) != 3:
            raise ShieldError(f"{cfg.ds_config}: masked training needs ZeRO stage 3")
        self.dtype = config_dtype(self.ds_config)
        loaded = load_model(cfg.model, ds_config=self.ds_config, dtype=self.dtype)
        self.processor, model = loaded.processor, loaded.model
        self.total_params = count_parameters(model)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.update == "mask":
            freeze_unselected(model, self.adapter, self.neuron_set)
        else:
            for p in model.parameters():
                p.requires_grad_(False)
            attach_deltas(model, self.adapter, self.neuron_set)

        plan = self._plan_epochs()
        total_steps = cfg.max_steps or math.ceil(cfg.epochs * plan["steps_per_epoch"])
        if total_steps < 1:
            raise ShieldError("nothing to train: --max-steps/--epochs give 0 optimizer steps")
        schedule = lr_lambda(cfg.schedule, cfg.warmup_steps, total_steps)
        engine = ShieldEngine(model, self.ds_config, training=True,
                              lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        self.engine = engine
        if cfg.update == "mask":
            masker = GradientMasker(engine.ds, build_masks(engine.module, self.adapter, self.neuron_set))
        else:
            masker = GradientMasker(engine.ds, delta_masks(engine.module))
        trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                        for p in engine.module.parameters() if p.requires_grad)

        self.out.mkdir(parents=True, exist_ok=True)
        self._fill_self_targets(engine)

        state = {"step": 0, "micro": 0}
        if cfg.resume:
            client = engine.load_checkpoint(self.out / "checkpoints")
            if client is not None:
                state = {"step": client["step"], "micro": client["micro"]}
                set_rng_state(client["rng"])
        writer = dist.Rank0Writer(self.out / "tb")
        writer.scalar("train/trainable_fraction", trainable / self.total_params, 0)
        writer.scalar("train/neuron_param_fraction", self.neuron_set.param_fraction, 0)
        from shield_ds.data import SafetyCollator

        collator = SafetyCollator(self.processor, self.adapter, train=True, max_length=cfg.max_length)
        engine.module.train()
        micro_steps = self._micro_steps(plan, total_steps * cfg.grad_accum)
        bar = dist.progress(range(state["micro"], len(micro_steps)), desc="train", unit="micro-batch",
                            initial=state["micro"], total=len(micro_steps))
        window = {"harmful": [0.0, 0], "benign": [0.0, 0], "tokens": 0, "t0": time.perf_counter()}
        for micro in bar:
            batch_records, weight = micro_steps[micro]
            batch = collator(batch_records, [weight] * len(batch_records)).to(engine.device, float_dtype=self.dtype)
            logits = engine(**batch.inputs, use_cache=False).logits
            per_sample = response_loss(logits, batch.labels)
            loss = (per_sample * batch.weights).sum() / len(batch_records)
            engine.backward(loss)
            _fault_injection(state["step"], boundary_next=engine.is_accumulation_boundary())
            for r, l, w in zip(batch_records, per_sample.detach().tolist(), batch.weights.tolist()):
                if w > 0:
                    window[r.label][0] += l
                    window[r.label][1] += 1
            window["tokens"] += int(batch.inputs["attention_mask"].sum()) if weight > 0 else 0
            boundary = engine.is_accumulation_boundary()
            if boundary:
                masker.apply()
            engine.step()
            state["micro"] = micro + 1
            if not boundary:
                continue
            state["step"] += 1
            self._log(writer, state["step"], window, masker, engine, bar)
            stop = preemption.should_stop()
            if (cfg.save_every and state["step"] % cfg.save_every == 0) or stop:
                engine.save_checkpoint(self.out / "checkpoints", state["step"],
                                       {**state, "rng": rng_state(), "config": asdict(cfg)}, keep_last=cfg.keep_last)
            if stop:
                log.warning("stopping at step %d for requeue", state["step"])
                writer.close()
                if dist.is_rank0():
                    mark_for_requeue(f"stopped at step {state['step']}")
                dist.barrier()
                torch_dist.destroy_process_group()
                sys.exit(REQUEUE_EXIT_CODE)
        writer.close()
        if cfg.export:
            self.export(engine, masker)
        self._write_summary(state, total_steps, trainable)

    # --- data plan -----------------------------------------------------------------------------
    def _plan_epochs(self) -> dict[str, Any]:
        from shield_ds.data import plan_batches, shard_batches

        batches = plan_batches(self.records, self.cfg.micro_batch_size)
        per_rank = len(shard_batches(batches, dist.rank(), dist.world_size()))
        return {"micro_per_epoch": per_rank, "steps_per_epoch": max(1, per_rank // self.cfg.grad_accum)}

    def _micro_steps(self, plan: dict[str, Any], count: int) -> list[tuple[list, float]]:
        """This rank's micro-batches for the whole run: epoch e shuffles records with seed + e."""
        from shield_ds.data import plan_batches, shard_batches

        records = self.records
        out: list[tuple[list, float]] = []
        epoch = 0
        while len(out) < count:
            order = list(records)
            random.Random(self.cfg.seed + epoch).shuffle(order)
            out += shard_batches(plan_batches(order, self.cfg.micro_batch_size), dist.rank(), dist.world_size())
            epoch += 1
        return out[:count]

    # --- benign targets ------------------------------------------------------------------------
    def _fill_self_targets(self, engine: ShieldEngine) -> None:
        """Generate missing benign answers with the (still untrained) model once; cache them in OUT."""
        if not self.needs_self_targets:
            return
        cache = self.out / BENIGN_TARGETS_FILE
        wanted = {r.id for r in self.needs_self_targets}
        responses: dict[str, str] = {}
        if cache.is_file():
            for _, row in read_jsonl(cache, lambda n: f"{cache} line {n}"):
                if row.get("model_hash") == self.config_hash:
                    responses[row["id"]] = row["response"]
        todo = [r for r in self.needs_self_targets if r.id not in responses]
        if todo:
            from shield_ds.evaluate.generate import generate_responses

            engine.module.eval()
            new = generate_responses(engine.module, self.processor, self.adapter, todo,
                                     batch_size=self.cfg.micro_batch_size, max_new_tokens=self.cfg.max_new_tokens,
                                     dtype=self.dtype, zero3=True, device=engine.device, desc="benign targets")
            engine.module.train()
            responses.update(new)
            if dist.is_rank0():
                write_text(cache, "".join(json.dumps({"id": k, "response": v, "model_hash": self.config_hash},
                                                     ensure_ascii=False) + "\n" for k, v in sorted(responses.items())))
        # An empty generation is still a target (the model answered with end-of-turn at once).
        from shield_ds.data.targets import with_responses

        self.records = with_responses(self.records, {k: v if v else " " for k, v in responses.items() if k in wanted})

    # --- logging -------------------------------------------------------------------------------
    def _log(self, writer, step: int, window: dict, masker, engine: ShieldEngine, bar) -> None:
        sums = torch.tensor([window["harmful"][0], window["harmful"][1], window["benign"][0], window["benign"][1],
                             window["tokens"]], dtype=torch.float64)
        if dist.is_initialized() and dist.world_size() > 1:
            torch_dist.all_reduce(sums)
        elapsed = max(time.perf_counter() - window["t0"], 1e-9)
        if sums[1] > 0:
            writer.scalar("train/loss_harmful", float(sums[0] / sums[1]), step)
        if sums[3] > 0:
            writer.scalar("train/loss_benign", float(sums[2] / sums[3]), step)
        writer.scalar("train/lr", engine.lr_scheduler.get_last_lr()[0], step)
        norm = masker.masked_grad_norm()
        if norm is not None:
            writer.scalar("train/grad_norm_masked", norm, step)
        writer.scalar("train/tokens_per_s", float(sums[4]) / elapsed, step)
        if hasattr(bar, "set_postfix"):
            total = (sums[0] + sums[2]) / max(float(sums[1] + sums[3]), 1.0)
            bar.set_postfix(step=step, loss=f"{float(total):.3f}")
        window.update({"harmful": [0.0, 0], "benign": [0.0, 0], "tokens": 0, "t0": time.perf_counter()})

    # --- export --------------------------------------------------------------------------------
    def export(self, engine: ShieldEngine, masker) -> None:
        """Write shield_patch.safetensors (the changed slices) and model/ (= patch applied to the base)."""
        from shield_ds.masking import merge_deltas
        from shield_ds.masking.partition_mask import neuron_params
        from shield_ds.patch import PatchEntry, apply_patch, resolve_checkpoint_dir, take, write_patch

        masker.remove()
        model = engine.module
        if self.cfg.update == "delta":
            merge_deltas(model)
        entries = []
        for name, param, kind, indices in neuron_params(model, self.adapter, self.neuron_set):
            with gathered(param):
                if dist.is_rank0():
                    entries.append(PatchEntry(name, kind, indices.clone(), take(param.detach().float().cpu(), kind, indices)))
        if dist.is_rank0():
            base_dir = resolve_checkpoint_dir(self.cfg.model)
            patch = self.out / PATCH_FILE
            write_patch(patch, entries, base_dir=base_dir, config_hash=self.config_hash,
                        extra_meta={"base_model": str(self.cfg.model), "neurons": str(self.cfg.neurons),
                                    "update": self.cfg.update, "neuron_count": self.neuron_set.count,
                                    "package_version": shield_ds.__version__})
            apply_patch(base_dir, patch, self.out / "model")
            log.info("exported %s and %s", patch, self.out / "model")
        dist.barrier()

    def _write_summary(self, state: dict, total_steps: int, trainable: int) -> None:
        if not dist.is_rank0():
            return
        summary = {"steps": state["step"], "total_steps": total_steps, "world_size": dist.world_size(),
                   "total_params": self.total_params, "trainable_params": trainable,
                   "neurons": self.neuron_set.count, "neuron_param_fraction": self.neuron_set.param_fraction,
                   "records": len(self.records), "config": asdict(self.cfg), "package_version": shield_ds.__version__}
        write_json(self.out / "train.json", summary)
        print(f"trained {self.neuron_set.count} neurons ({self.neuron_set.param_fraction:.6%} of "
              f"{self.total_params} parameters) for {state['step']} steps on {len(self.records)} records; "
              f"outputs in {self.out}", flush=True)
