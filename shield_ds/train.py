"""Stage 2: fine-tune only the safety neurons under ZeRO-3 (the `ShieldTrainer` recipe).

Mask mode (default): every parameter without a selected neuron is frozen before
deepspeed.initialize; the FFN matrices that hold selected neurons train with `PartitionMask`s
applied to each rank's gradient partition before the optimizer step (which also owns weight
decay), so nothing outside the selected rows/columns moves. Delta mode: base weights frozen,
small parameters hold the selected rows/columns (optimizer state for those alone). Both compute
weight gradients for the selected slices only, with the same arithmetic (`masking.neuron_linear`). Both export the same way: the changed
slices go into `shield_patch.safetensors`, which applied to the base checkpoint gives `model/`.

Baseline arms (the paper's controls, same data, steps and schedule):
- `--neurons random:SEED[:LIKE_DIR]`: mask/delta training of random neurons with the per-layer counts
  of the set in LIKE_DIR (default `--like-neurons`, else runs/identify), `NeuronSet.random_like`;
- `--update lora`: PEFT LoRA on the language model's attention and MLP projections (`--lora-rank R`
  or `--lora-budget match`: the rank whose trainable count is closest to the neuron set's);
- `--update full-ffn`: every FFN matrix of the language model trains (upper bound).
LoRA and full-ffn train plainly (no gradient mask; weight decay as the ds_config says) and export
`model/` only: the changed tensors (LoRA merged) written over a copy of the base checkpoint, every
other tensor bit-identical; there is no patch file for them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from transformers import set_seed

import shield_ds
from shield_ds import dist
from shield_ds.config import LATER_DATA_OPTIONS, DataConfig, EngineConfig, option, redefault
from shield_ds.data.records import check_language
from shield_ds.engine import (MASKED_MODES, ShieldEngine, complete_checkpoints, config_dtype, read_run_info,
                              replica_fits_on_every_rank, resolve_ds_config, zero_stage)
from shield_ds.process_group import exit_distributed
from shield_ds.zero_internals import gathered
from shield_ds.errors import ShieldError
from shield_ds.io import read_jsonl, write_json, write_text
from shield_ds.trainable import LORA_TARGETS, LoraSettings, ffn_parameters, is_lora_layer, lora_delta
from shield_ds.data import SafetyCollator, plan_batches, shard_batches
from shield_ds.data.splits import trained_provenance
from shield_ds.data.targets import (check_targets, cut_at_sentence_end, load_refusals, pivot_sources, with_refusals,
                                    with_responses)
from shield_ds.evaluate.generate import generate_responses
from shield_ds.launch.preemption import PreemptionHandler, REQUEUE_EXIT_CODE, mark_for_requeue
from shield_ds.masking import merge_deltas
from shield_ds.masking.partition import param_shape
from shield_ds.masking.partition_mask import neuron_params
from shield_ds.models import config_hash, get_adapter, load_config, load_model, load_processor
from shield_ds.neurons import NeuronSet
from shield_ds.patch import (CheckpointFiles, PatchEntry, apply_patch, resolve_checkpoint_dir, rewrite_checkpoint,
                             take, write_patch)

log = dist.get_logger("train")

BENIGN_TARGETS_FILE = "benign_targets.jsonl"
PATCH_FILE = "shield_patch.safetensors"
SNAPSHOT_DIR = "snapshots"


def snapshot_dir(out: str | os.PathLike, step: int) -> Path:
    """Where `--export-steps` puts the export of optimizer step `step` (patch and/or model/)."""
    return Path(out) / SNAPSHOT_DIR / f"step-{step}"
DEFAULT_NEURONS = "runs/identify"
Update = Literal["mask", "delta", "lora", "full-ffn"]
UPDATES = get_args(Update)
RANDOM_PREFIX = "random:"


@dataclass
class TrainConfig(DataConfig, EngineConfig):
    """Stage 2's options (with the shared data and engine options)."""

    ds_config: str | None = redefault(EngineConfig, "ds_config", "ds_configs/zero3_bf16.json")
    neurons: str | None = option(None, "an identify output directory (default runs/identify), or random:SEED[:LIKE_DIR] "
                                 "for random neurons with the per-layer counts of LIKE_DIR's set (the control arm)")
    like_neurons: str | None = option(None, "for --neurons random:SEED without LIKE_DIR: the set to copy counts from "
                                      "(default runs/identify)")
    benign_targets: Literal["none", "self"] = option(
        "none", "'self': the base model answers benign prompts that have no response (cached in --out)")
    benign_pivot: str | None = option(
        None, "with --benign-targets self: a benign prompt of another language is answered by the base model's answer "
        "to the same prompt in this language (e.g. en, for languages it answers with loops); prompts without that "
        "version keep their own")
    refusals: str | None = option(None, "JSON/YAML file: language -> list of refusal templates")
    max_new_tokens: int = option(32, "limit of self-generated benign answers (one that reaches it is cut back to its "
                                 "last sentence end and trained without end of turn, or left out)")
    max_length: int | None = option(1024, "cut training sequences to this many tokens (longer prompts are left out)")
    update: Update = option("mask", "mask/delta: train the selected neurons; lora, full-ffn: baseline arms "
                            "(export model/ only)")
    lora_rank: int | None = option(None, "LoRA rank (--update lora)")
    lora_budget: Literal["match"] | None = option(
        None, "match: the LoRA rank whose trainable count is closest to the --neurons set's")
    lora_targets: list[str] | None = option(None, "comma-separated decoder-layer projections for LoRA (q, k, ... or "
                                            "q_proj, ...; default q,k,v,o,gate,up,down)")
    lora_alpha: float | None = option(None, "LoRA alpha (default 2 * rank)")
    max_steps: int | None = option(None, "optimizer steps (default: --epochs)")
    epochs: float = option(1.0, "passes over the data when --max-steps is not given")
    lr: float | None = option(None, "learning rate (default: the ds_config's)")
    schedule: Literal["constant", "linear", "cosine"] = option("constant", "learning-rate schedule")
    warmup_steps: int = option(0, "linear warm-up steps")
    micro_batch_size: int = option(4, "records per rank per forward pass", aliases=["--batch-size", "--batch_size"])
    grad_accum: int = option(1, "micro-batches per optimizer step")
    save_every: int = option(0, "checkpoint every N optimizer steps (0: only on preemption)")
    keep_last: int = option(2, "complete checkpoints to keep")
    resume: bool = option(False, "continue from the newest complete checkpoint in --out (refused when that run's "
                          "settings differ in anything that changes the result)")
    resume_force: bool = option(False, "with --resume: continue even when the settings differ (a warning names them); "
                                "the checkpoint gives the optimizer state and the schedule's position, this run the rest")
    out: str = option("runs/train", "output directory")
    export: bool = option(True, "write model/ and the patch at the end (--no-export skips them)")
    export_steps: list[int] = option([], "comma-separated optimizer steps before the last at which to also export "
                                     "OUT/snapshots/step-N/ (evaluate them for an ASR vs over-refusal curve)")
    gradient_checkpointing: bool = option(False, "recompute activations in backward (large models)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ds_config is None:
            raise ShieldError("--ds-config none is for inference; training needs a DeepSpeed config")
        if self.benign_pivot is not None:
            if self.benign_targets != "self":
                raise ShieldError("--benign-pivot needs --benign-targets self")
            try:
                self.benign_pivot = check_language(self.benign_pivot)
            except ShieldError as exc:
                raise ShieldError(f"--benign-pivot: {exc}") from None


# --- resume safety -------------------------------------------------------------------------------
# Options added after checkpoints were first written, with the value such a checkpoint's run had.
LATER_TRAIN_OPTIONS = {**LATER_DATA_OPTIONS, "benign_pivot": None}
# TrainConfig fields a resumed run may change: where and how often it writes, and how it computes the same
# numbers. The batch plan, lr and ds_config enter run_fingerprint in a world-size-independent form instead.
RESUME_FREE_FIELDS = ("out", "save_every", "keep_last", "resume", "resume_force", "export", "export_steps",
                      "gradient_checkpointing", "cpu_threads",
                      "micro_batch_size", "grad_accum", "lr", "ds_config", "ds_overrides")
# Entries of the resolved ds_config (dotted prefixes) that leave the result alone: batch sizes (in
# global_batch_size), the lr (in lr), the ZeRO layout, checkpoint I/O, logging, and torch vs fused Adam
# (the same update).
DS_RESULT_FREE = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                  "zero_optimization", "checkpoint", "steps_per_print", "wall_clock_breakdown", "optimizer.params.lr",
                  "optimizer.params.torch_adam")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and scalars are leaves."""
    if not isinstance(value, dict) or not value:
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def run_fingerprint(cfg: TrainConfig, ds_config: dict[str, Any], world_size: int, *,
                    model_config_hash: str | None = None, neuron_set_digest: str | None = None,
                    data_digest: str | None = None) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint to compute the same result
    (flat, JSON-ready): every TrainConfig field but RESUME_FREE_FIELDS; the global batch size (so another
    world size with the same global batch may resume); the effective lr; the rest of the resolved
    ds_config but DS_RESULT_FREE; the model's config hash and content digests of the neuron set and data."""
    flat = _flatten(ds_config)
    ds = {key: value for key, value in flat.items()
          if not any(key == free or key.startswith(free + ".") for free in DS_RESULT_FREE)}
    fingerprint = {key: value for key, value in asdict(cfg).items() if key not in RESUME_FREE_FIELDS}
    fingerprint.update({"lr": flat.get("optimizer.params.lr", cfg.lr),
                        "global_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
                        "model_config_hash": model_config_hash, "neuron_set_digest": neuron_set_digest,
                        "data_digest": data_digest})
    fingerprint.update({f"ds_config.{key}": value for key, value in ds.items()})
    return json.loads(json.dumps(fingerprint))  # as it reads back from the checkpoint's JSON


def fingerprint_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'name (saved -> now)' for each entry that differs, in a stable order (an entry a checkpoint predates
    counts as its LATER_TRAIN_OPTIONS value)."""
    saved = {**{k: v for k, v in LATER_TRAIN_OPTIONS.items() if k in now}, **saved}

    def show(value: Any) -> str:
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= 40 else text[:37] + "..."

    keys = list(now) + [key for key in saved if key not in now]
    return [f"{key} ({show(saved.get(key))} -> {show(now.get(key))})" for key in keys if saved.get(key) != now.get(key)]


def check_resume(tag_dir: Path, fingerprint: dict[str, Any], force: bool, *, world_size: int,
                 universal: bool = False) -> None:
    """Refuse to resume from `tag_dir` when its run's settings differ in anything that changes the result
    (a ShieldError naming them), unless `force` (then a warning names them). Another world size passes
    that check, but DeepSpeed loads ZeRO-3 optimizer state only at the saved world size unless the
    ds_config loads a universal checkpoint (`universal`): refused in one line rather than its traceback."""
    info = read_run_info(tag_dir)
    info = info if isinstance(info, dict) else {}
    saved = info.get("fingerprint")
    differences = fingerprint_differences(saved, fingerprint) if isinstance(saved, dict) else []
    if not isinstance(saved, dict) or differences:
        what = (f"was written with other settings: {'; '.join(differences)}" if differences
                else "has no record of its run's settings (written by an older shield-ds)")
        if not force:
            raise ShieldError(f"--resume: checkpoint {tag_dir} {what}; resume with the same settings, "
                              f"or add --resume-force")
        log.warning("--resume-force: resuming although checkpoint %s %s", tag_dir, what)
    saved_world = info.get("world_size")
    if saved_world is not None and saved_world != world_size and not universal:
        raise ShieldError(f"--resume: checkpoint {tag_dir} was saved by {saved_world} ranks and this run has "
                          f"{world_size}: DeepSpeed loads ZeRO-3 optimizer state only at the same world size (or "
                          f"from a universal checkpoint, ds_config checkpoint.load_universal)")


def apply_optimizer_settings(engine: ShieldEngine, params: dict[str, Any]) -> None:
    """Put the ds_config's optimizer settings (`params`: lr, weight_decay, betas, ...) in place of those a
    loaded checkpoint restored; the optimizer's moments and the schedule's position stay the checkpoint's.
    For --resume-force, whose point is to continue with this run's settings."""
    scheduler = engine.lr_scheduler  # the LambdaLR of run(): lr = base lr x schedule(step)
    for index, group in enumerate(engine.optimizer.param_groups):
        for key, value in params.items():
            if key in group and key not in ("params", "lr"):
                group[key] = tuple(value) if isinstance(value, list) else value
        if "lr" in params:
            group["initial_lr"] = scheduler.base_lrs[index] = float(params["lr"])
            group["lr"] = float(params["lr"]) * scheduler.lr_lambdas[index](scheduler.last_epoch)


def neuron_set_digest(neuron_set) -> str:
    """sha256 of a neuron set's content (each layer's sorted indices)."""
    text = "".join(f"{layer}:{','.join(map(str, neuron_set.indices(layer).tolist()))}\n"
                   for layer in sorted(neuron_set.layers))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def records_digest(records: list) -> str:
    """sha256 of what training reads from each record (ids, labels, prompts, images, responses), in order."""
    fields = ("prompt_key", "id", "label", "language", "modality", "prompt", "image", "image_text", "response")
    digest = hashlib.sha256()
    for record in records:
        digest.update((json.dumps([getattr(record, f) for f in fields], ensure_ascii=False) + "\n").encode("utf-8"))
    return digest.hexdigest()


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


def _fault_injection(step: int, boundary_next: bool) -> None:
    """Testing aid: SHIELD_DS_FAULT_KILL="RANK:STEP" SIGKILLs rank RANK during optimizer step STEP+1
    (at the micro-batch that ends its accumulation window, before the optimizer step), like a node
    dying mid-run."""
    spec = os.environ.get("SHIELD_DS_FAULT_KILL")
    if not spec or not boundary_next:
        return
    rank, at = (int(x) for x in spec.split(":"))
    if dist.rank() == rank and step == at:
        import signal

        log.warning("fault injection: SIGKILL rank %d during step %d", rank, step + 1)
        os.kill(os.getpid(), signal.SIGKILL)


def _fault_pause(step: int, preemption) -> None:
    """Testing aid: SHIELD_DS_FAULT_PAUSE="STEP:SECONDS" holds this rank after optimizer step STEP (and its
    checkpoint) until a preemption signal reaches it or SECONDS pass, so a test can signal a run mid-way
    however fast it trains."""
    spec = os.environ.get("SHIELD_DS_FAULT_PAUSE")
    if not spec:
        return
    at, seconds = spec.split(":")
    if step != int(at):
        return
    deadline = time.monotonic() + float(seconds)
    while time.monotonic() < deadline and not preemption.stop_requested_locally():
        time.sleep(0.05)


def rng_state() -> dict[str, Any]:
    """Every generator a step can draw from: Python, NumPy, torch's CPU and this rank's CUDA device."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device's (each rank checkpoints its own)
    return state


def rank_rng_state(saved: dict[str, Any] | list[dict[str, Any]]) -> dict[str, Any]:
    """This rank's generators from a checkpoint's per-rank list (rank 0's when the world size changed)."""
    if isinstance(saved, dict):  # written before per-rank states
        return saved
    return saved[dist.rank()] if len(saved) == dist.world_size() else saved[0]


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass(frozen=True)
class RandomSpec:
    """A parsed `random:SEED[:LIKE_DIR]` neuron spec."""

    seed: int
    like: str | None


def parse_random_spec(spec: str) -> RandomSpec:
    """`random:7` / `random:7:runs/identify` -> RandomSpec; a bad seed is a ShieldError."""
    _, _, rest = spec.partition(":")
    seed_text, sep, like = rest.partition(":")
    if not seed_text.strip().isdigit() or int(seed_text) >= 2 ** 63:
        raise ShieldError(f"--neurons {spec!r}: expected random:SEED[:LIKE_DIR] with SEED a non-negative integer")
    if sep and not like:
        raise ShieldError(f"--neurons {spec!r}: empty LIKE_DIR after the seed")
    return RandomSpec(int(seed_text), like or None)


class ShieldTrainer:
    """Validates everything, loads the model partitioned, trains the chosen arm, exports."""

    def __init__(self, cfg: TrainConfig):
        if cfg.resume_force and not cfg.resume:
            raise ShieldError("--resume-force is only for --resume")
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.random = parse_random_spec(cfg.neurons) if (cfg.neurons or "").startswith(RANDOM_PREFIX) else None
        self._check_arm_flags()
        self.arm = {"lora": "lora", "full-ffn": "full-ffn"}.get(cfg.update, "random" if self.random else "safety")
        # The neuron set directory to read (None: this arm needs none).
        if self.random:
            self.neurons_dir: str | None = self.random.like or cfg.like_neurons or DEFAULT_NEURONS
        elif cfg.update in ("mask", "delta") or cfg.lora_budget == "match":
            self.neurons_dir = cfg.neurons or DEFAULT_NEURONS
        else:
            self.neurons_dir = None

    def _check_arm_flags(self) -> None:
        """Flags that belong to another arm are refused (one line, before anything is read or written)."""
        cfg = self.cfg
        bad = [s for s in cfg.export_steps if s < 1]
        if bad:
            raise ShieldError(f"--export-steps: step {bad[0]} is not a positive optimizer step")
        if cfg.export_steps and (cfg.update == "delta" or not cfg.export):
            raise ShieldError("--export-steps needs the export of --update mask, lora or full-ffn "
                              "(delta merges its slices into the weights when it exports)")
        lora_flags = {"--lora-rank": cfg.lora_rank, "--lora-budget": cfg.lora_budget,
                      "--lora-targets": cfg.lora_targets, "--lora-alpha": cfg.lora_alpha}
        if cfg.update != "lora":
            given = [flag for flag, value in lora_flags.items() if value is not None]
            if given:
                raise ShieldError(f"{given[0]} is only for --update lora (not --update {cfg.update})")
        if cfg.like_neurons is not None and not self.random:
            raise ShieldError("--like-neurons is only for --neurons random:SEED")
        if self.random and self.random.like and cfg.like_neurons and self.random.like != cfg.like_neurons:
            raise ShieldError(f"--neurons {cfg.neurons!r} names LIKE_DIR {self.random.like} but --like-neurons says "
                              f"{cfg.like_neurons}; give one")
        if cfg.update in ("mask", "delta"):
            return
        if self.random:
            raise ShieldError(f"--neurons {cfg.neurons!r} is for the neuron arms (--update mask or delta), "
                              f"not --update {cfg.update}")
        if cfg.update == "full-ffn":
            if cfg.neurons is not None:
                raise ShieldError("--update full-ffn trains every FFN matrix and ignores --neurons; drop it")
            return
        if cfg.lora_rank is None and cfg.lora_budget is None:
            raise ShieldError("--update lora needs --lora-rank R or --lora-budget match")
        if cfg.lora_rank is not None and cfg.lora_budget is not None:
            raise ShieldError("give --lora-rank or --lora-budget, not both")
        if cfg.lora_rank is not None and cfg.lora_rank < 1:
            raise ShieldError(f"--lora-rank must be at least 1, not {cfg.lora_rank}")
        if cfg.lora_rank is not None and cfg.neurons is not None:
            raise ShieldError("--update lora --lora-rank ignores --neurons; drop it (or size the rank from the set "
                              "with --lora-budget match)")
        if cfg.lora_alpha is not None and not cfg.lora_alpha > 0:
            raise ShieldError(f"--lora-alpha must be positive, not {cfg.lora_alpha}")
        if cfg.lora_targets is not None and not cfg.lora_targets:
            raise ShieldError("--lora-targets is empty")

    # --- preparation (no output is written until all of it passed) -------------------------------
    def prepare(self) -> None:
        cfg = self.cfg
        self.config = load_config(cfg.model)
        self.adapter = get_adapter(self.config)
        self.adapter.check_modalities(cfg.modalities)
        self.config_hash = config_hash(self.config)
        self.neuron_set = self._load_neuron_set() if self.neurons_dir is not None else None
        records = cfg.load_records(require=())
        if not records:
            raise ShieldError("empty training set: no records for the requested languages and modalities")
        records = self._drop_overlong(with_refusals(records, load_refusals(cfg.refusals)))
        self.needs_self_targets = [r for r in records if not r.response]
        # record id -> the pivot-language record whose answer becomes its target (--benign-pivot)
        self.pivots = self._pivot_sources() if cfg.benign_pivot is not None else {}
        if cfg.benign_targets != "self":
            check_targets(records)
        self.records = records
        self.self_targets: dict[str, int] | None = None  # set once the benign targets are in
        self.ds_config = resolve_ds_config(cfg.ds_config, micro_batch_size=cfg.micro_batch_size,
                                           grad_accum=cfg.grad_accum, lr=cfg.lr, overrides=cfg.ds_overrides)
        if zero_stage(self.ds_config) != 3:
            raise ShieldError(f"{cfg.ds_config}: masked training needs ZeRO stage 3")
        self.dtype = config_dtype(self.ds_config)
        self.fingerprint = run_fingerprint(
            cfg, self.ds_config, dist.world_size(), model_config_hash=self.config_hash,
            neuron_set_digest=neuron_set_digest(self.neuron_set) if self.neuron_set is not None else None,
            data_digest=records_digest(records))
        if cfg.resume and (found := complete_checkpoints(self.out / "checkpoints")):
            check_resume(found[-1], self.fingerprint, cfg.resume_force, world_size=dist.world_size(),
                         universal=bool(self.ds_config.get("checkpoint", {}).get("load_universal")))

    def _pivot_sources(self) -> dict:
        """The benign records to answer in --benign-pivot's language instead (all of the split's prompts in that
        language are candidates, not only the sampled ones)."""
        cfg = self.cfg
        pivot_cfg = replace(cfg, harmful=[], languages=[cfg.benign_pivot], per_group_limit=None,
                            benign_per_group_limit=None)
        try:
            pivot_records = pivot_cfg.load_records(require=("benign",))
        except ShieldError as exc:
            raise ShieldError(f"--benign-pivot {cfg.benign_pivot}: {exc}") from None
        pivots = pivot_sources(self.needs_self_targets, pivot_records, cfg.benign_pivot)
        log.info("--benign-pivot %s: %d benign prompts are answered by the model's answer to their %s version",
                 cfg.benign_pivot, len(pivots), cfg.benign_pivot)
        return pivots

    def _load_neuron_set(self):
        """The set this arm trains (or sizes LoRA from), checked against the model; random arms draw theirs."""
        where = f"like set {self.neurons_dir}" if self.random else f"neuron set {self.neurons_dir}"
        try:
            neuron_set = NeuronSet.load(self.neurons_dir)
        except ShieldError as exc:
            if self.cfg.update == "lora":
                raise ShieldError(f"--lora-budget match needs a neuron set: {exc}") from None
            raise
        neuron_set.check_matches(self.config_hash, self.adapter.num_layers(self.config),
                                 self.adapter.intermediate_size(self.config), self.adapter.hidden_size(self.config),
                                 where=where, model=str(self.cfg.model))
        if neuron_set.count == 0:
            raise ShieldError(f"{where} selects no neurons: nothing to train")
        if self.random:
            neuron_set = NeuronSet.random_like(neuron_set, self.random.seed, source=str(self.neurons_dir))
        return neuron_set

    def _drop_overlong(self, records: list) -> list:
        """Leave out records whose prompt alone fills --max-length (they would teach nothing)."""
        if self.cfg.max_length is None:
            return records

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

    def _lora_settings(self) -> LoraSettings | None:
        """The LoRA arm's settings (the neuron set's parameter count as the budget for --lora-budget match)."""
        cfg = self.cfg
        if cfg.update != "lora":
            return None
        budget = (self.neuron_set.count * self.adapter.param_count_per_neuron(self.config)
                  if cfg.lora_budget == "match" else None)
        return LoraSettings(rank=cfg.lora_rank if budget is None else None, budget_params=budget,
                            targets=tuple(cfg.lora_targets or LORA_TARGETS), alpha=cfg.lora_alpha)

    # --- main ----------------------------------------------------------------------------------
    def run(self) -> None:
        # Installed first: a pre-timeout or preemption signal that arrives while the model loads (minutes
        # at 70B) must stop the run at its first step, not kill the rank (the default action of SIGUSR1).
        preemption = PreemptionHandler()
        self.prepare()
        cfg = self.cfg
        set_seed(cfg.seed)  # python, numpy and torch (every device)
        self._fill_self_targets(None)  # before the ZeRO-3 load, on a plain replica, when it fits
        self.total_steps = self._total_steps()  # self-generated targets fill records in, never remove them
        schedule = lr_lambda(cfg.schedule, cfg.warmup_steps, self.total_steps)
        engine = ShieldEngine.load(cfg.model, self.ds_config, mode=cfg.update, neuron_set=self.neuron_set,
                                   lora=self._lora_settings(), gradient_checkpointing=cfg.gradient_checkpointing,
                                   lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        self.engine = engine
        self.processor, self.total_params = engine.loaded.processor, engine.total_params
        if engine.lora is not None:
            self.lora = {**engine.lora, "budget": cfg.lora_budget}
        optimizer_params = engine.optimizer_params()
        # What can change: in mask mode only the selected slices of the trainable matrices.
        trainable = (neuron_slice_params(engine.module, self.adapter, self.neuron_set) if cfg.update == "mask"
                     else optimizer_params)
        self.optimizer_params = optimizer_params

        self.out.mkdir(parents=True, exist_ok=True)
        self._fill_self_targets(engine)
        total_steps = self.total_steps

        state = {"step": 0, "micro": 0, "seconds": 0.0}
        if cfg.resume:
            client = engine.load_checkpoint(self.out / "checkpoints")
            if client is not None:  # saved at an optimizer step: its micro-batch index follows from this run's plan
                state = {"step": client["step"], "micro": client["step"] * cfg.grad_accum,
                         "seconds": client.get("seconds", 0.0)}
                set_rng_state(rank_rng_state(client["rng"]))
                if cfg.resume_force:
                    apply_optimizer_settings(engine, self.ds_config.get("optimizer", {}).get("params", {}))
        writer = dist.Rank0Writer(self.out / "tb")
        writer.scalar("train/trainable_fraction", trainable / self.total_params, 0)
        if self.neuron_set is not None:
            writer.scalar("train/neuron_param_fraction", self.neuron_set.param_fraction, 0)

        collator = SafetyCollator(self.processor, self.adapter, train=True, max_length=cfg.max_length)
        engine.module.train()
        plan = self._plan_epochs()
        micro_steps = self._micro_steps(plan, total_steps * cfg.grad_accum)
        bar = dist.progress(range(state["micro"], len(micro_steps)), desc="train", unit="micro-batch",
                            initial=state["micro"], total=len(micro_steps))
        window = {"harmful": [0.0, 0], "benign": [0.0, 0], "tokens": 0, "t0": time.perf_counter()}
        started = time.perf_counter() - state["seconds"]
        for micro in bar:
            batch_records, weight = micro_steps[micro]
            batch = collator(batch_records, [weight] * len(batch_records)).to(engine.device, float_dtype=self.dtype)
            _fault_injection(state["step"], boundary_next=engine.is_accumulation_boundary())
            per_sample, boundary = engine.train_step(batch)
            for r, l, w in zip(batch_records, per_sample.tolist(), batch.weights.tolist()):
                if w > 0:
                    window[r.label][0] += l
                    window[r.label][1] += 1
            window["tokens"] += int(batch.inputs["attention_mask"].sum()) if weight > 0 else 0
            state["micro"] = micro + 1
            if not boundary:
                continue
            state["step"] += 1
            state["seconds"] = time.perf_counter() - started
            self._log(writer, state["step"], window, engine, bar)
            if state["step"] in cfg.export_steps and state["step"] < total_steps:
                self.export(engine, dest=snapshot_dir(self.out, state["step"]), final=False)
            stop = preemption.should_stop()
            if (cfg.save_every and state["step"] % cfg.save_every == 0) or stop:
                engine.save_checkpoint(self.out / "checkpoints", state["step"],
                                       {**state, "rng": dist.all_gather_object(rng_state()), "config": asdict(cfg)},
                                       keep_last=cfg.keep_last,
                                       run_info={"fingerprint": self.fingerprint, "world_size": dist.world_size()})
            _fault_pause(state["step"], preemption)
            if stop:
                log.warning("stopping at step %d for requeue", state["step"])
                writer.close()
                if dist.is_rank0():
                    mark_for_requeue(f"stopped at step {state['step']}")
                exit_distributed(REQUEUE_EXIT_CODE)
                sys.exit(REQUEUE_EXIT_CODE)  # inside a host (submitit), which reads the code
        state["seconds"] = time.perf_counter() - started
        writer.close()
        patch = None
        if cfg.export:
            patch = self.export(engine)
        self._write_summary(state, total_steps, trainable, patch)

    def _total_steps(self) -> int:
        cfg = self.cfg
        total = cfg.max_steps or math.ceil(cfg.epochs * self._plan_epochs()["steps_per_epoch"])
        if total < 1:
            raise ShieldError("nothing to train: --max-steps/--epochs give 0 optimizer steps")
        return total

    # --- data plan -----------------------------------------------------------------------------
    def _plan_epochs(self) -> dict[str, Any]:
        batches = plan_batches(self.records, self.cfg.micro_batch_size)
        per_rank = len(shard_batches(batches, dist.rank(), dist.world_size()))
        return {"micro_per_epoch": per_rank, "steps_per_epoch": max(1, per_rank // self.cfg.grad_accum)}

    def _micro_steps(self, plan: dict[str, Any], count: int) -> list[tuple[list, float]]:
        """This rank's micro-batches for the whole run: epoch e shuffles records with seed + e."""
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
    def _fill_self_targets(self, engine: ShieldEngine | None) -> None:
        """Generate missing benign answers with the (still untrained) model once; cache them in OUT.

        Without `engine` (before the ZeRO-3 load): only when a full replica of the base fits on every
        rank (`replica_fits_on_every_rank`, all ranks agreeing); each rank then generates its shard on a plain copy, which avoids
        ZeRO-3's per-token parameter gathers. Otherwise the partitioned engine generates, in lockstep.

        An answer that reached --max-new-tokens without ending is cut back to its last sentence end
        (kept whole when it has none) and trained without the end of turn: closing it would teach
        short answers. Counts go to train.json (`self_targets`).
        """
        if not self.needs_self_targets or self.self_targets is not None:
            return

        cache = self.out / BENIGN_TARGETS_FILE
        # record id -> the record whose prompt the model answers (itself, or its --benign-pivot version)
        sources = {r.id: self.pivots.get(r.id, r) for r in self.needs_self_targets}
        wanted = {s.id for s in sources.values()}
        responses: dict[str, tuple[str, bool]] = {}
        if cache.is_file():
            for _, row in read_jsonl(cache, lambda n: f"{cache} line {n}"):
                if (row.get("model_hash") == self.config_hash and row.get("max_new_tokens") == self.cfg.max_new_tokens
                        and isinstance(row.get("finished"), bool)):
                    responses[row["id"]] = (row["response"], row["finished"])
        todo = list({s.id: s for s in sources.values() if s.id not in responses}.values())
        if todo and engine is None:
            if not replica_fits_on_every_rank(self.cfg.model, self.dtype):
                return  # generated after the ZeRO-3 load
        if todo:
            if engine is None:
                log.info("generating %d benign targets on a replica of the base model per rank", len(todo))
                replica = load_model(self.cfg.model, dtype=self.dtype)
                model, processor, device, zero3 = replica.model.eval().to(dist.device()), replica.processor, \
                    dist.device(), False
            else:
                model, processor, device, zero3 = engine.module.eval(), self.processor, engine.device, True
            new = generate_responses(model, processor, self.adapter, todo,
                                     batch_size=self.cfg.micro_batch_size, max_new_tokens=self.cfg.max_new_tokens,
                                     dtype=self.dtype, zero3=zero3, device=device, desc="benign targets",
                                     return_finished=True)
            if engine is None:
                del model, replica
            else:
                engine.module.train()
            responses.update(new)
            if dist.is_rank0():
                write_text(cache, "".join(json.dumps({"id": k, "response": v, "finished": done,
                                                      "max_new_tokens": self.cfg.max_new_tokens,
                                                      "model_hash": self.config_hash}, ensure_ascii=False) + "\n"
                                          for k, (v, done) in sorted(responses.items())))
        targets: dict[str, str] = {}
        cut, unended = set(), set()
        for key, source in sources.items():
            if source.id not in responses:
                continue
            text, finished = responses[source.id]
            if finished:
                # An empty generation is still a target (the model answered with end-of-turn at once).
                targets[key] = text or " "
            elif (short := cut_at_sentence_end(text)) is not None:
                targets[key] = short
                cut.add(key)
            else:  # no sentence end at all: kept whole, as an open answer (it teaches no length)
                targets[key] = text or " "
                unended.add(key)
        records = with_responses(self.records, targets)
        self.records = [replace(r, response_open=True) if r.id in cut | unended else r for r in records]
        self.self_targets = {"generated": len(wanted), "cut": len(cut), "open_without_sentence_end": len(unended),
                             "max_new_tokens": self.cfg.max_new_tokens}
        if self.cfg.benign_pivot is not None:
            # several records can share one pivot answer: "generated" counts answers, the rest records
            self.self_targets.update(pivot=self.cfg.benign_pivot, pivoted=len(self.pivots), records=len(sources))
        if cut or unended:
            log.warning("self-generated benign answers: %d of %d reached --max-new-tokens %d; %d cut back to their "
                        "last sentence end, %d without a sentence end kept whole; both are trained without the end "
                        "of turn",
                        len(cut) + len(unended), len(sources), self.cfg.max_new_tokens, len(cut), len(unended))

    # --- logging -------------------------------------------------------------------------------
    def _log(self, writer, step: int, window: dict, engine: ShieldEngine, bar) -> None:
        sums = torch.tensor([window["harmful"][0], window["harmful"][1], window["benign"][0], window["benign"][1],
                             window["tokens"]], dtype=torch.float64)
        dist.all_reduce(sums)
        elapsed = max(time.perf_counter() - window["t0"], 1e-9)
        if sums[1] > 0:
            writer.scalar("train/loss_harmful", float(sums[0] / sums[1]), step)
        if sums[3] > 0:
            writer.scalar("train/loss_benign", float(sums[2] / sums[3]), step)
        writer.scalar("train/lr", engine.lr_scheduler.get_last_lr()[0], step)
        norm = engine.grad_norm()
        if norm is not None:
            writer.scalar("train/grad_norm_masked" if engine.masker is not None else "train/grad_norm", norm, step)
        writer.scalar("train/tokens_per_s", float(sums[4]) / elapsed, step)
        if hasattr(bar, "set_postfix"):
            total = (sums[0] + sums[2]) / max(float(sums[1] + sums[3]), 1.0)
            bar.set_postfix(step=step, loss=f"{float(total):.3f}")
        window.update({"harmful": [0.0, 0], "benign": [0.0, 0], "tokens": 0, "t0": time.perf_counter()})

    # --- export --------------------------------------------------------------------------------
    def export(self, engine: ShieldEngine, dest: Path | None = None, final: bool = True) -> str | None:
        """Neuron arms: shield_patch.safetensors (the changed slices) and model/ (= patch applied to the base).
        LoRA / full-ffn: model/ only (changed tensors over a copy of the base). Returns the patch file name or None.

        Collective. `dest` (default --out) and `final=False` export a snapshot mid-run: the masks stay on.
        """
        dest = dest or self.out
        if self.cfg.update not in MASKED_MODES:
            self._export_merged(engine, dest)
            return None

        model = engine.module
        if final:
            engine.remove_masker()
            if self.cfg.update == "delta":
                merge_deltas(model)
        entries = []
        for name, param, kind, indices in neuron_params(model, self.adapter, self.neuron_set):
            with gathered(param):
                if dist.is_rank0():
                    # Slice on the parameter's device, then copy only the slice to the host.
                    values = take(param.detach(), kind, indices.to(param.device)).float().cpu()
                    entries.append(PatchEntry(name, kind, indices.clone(), values))
        if dist.is_rank0():
            base_dir = resolve_checkpoint_dir(self.cfg.model)
            patch = dest / PATCH_FILE
            dest.mkdir(parents=True, exist_ok=True)
            extra = {"base_model": str(self.cfg.model), "neurons": str(self.cfg.neurons or DEFAULT_NEURONS),
                     "update": self.cfg.update, "neuron_count": self.neuron_set.count, "arm": self.arm,
                     "package_version": shield_ds.__version__}
            if self.random:
                extra["random"] = self.neuron_set.meta["random"]
            extra["provenance"] = self._provenance()
            write_patch(patch, entries, base_dir=base_dir, config_hash=self.config_hash, extra_meta=extra)
            apply_patch(base_dir, patch, dest / "model")
            log.info("exported %s and %s", patch, dest / "model")
        dist.barrier()
        return PATCH_FILE

    def _provenance(self) -> dict[str, Any]:
        """What the exported model was trained on (for the evaluation's overlap check)."""
        return trained_provenance(self.records, self.cfg.split_spec, languages=self.cfg.languages,
                                  modalities=self.cfg.modalities)

    def _export_merged(self, engine: ShieldEngine, dest: Path) -> None:
        """model/ = the base checkpoint's files with the trained tensors (LoRA merged) written over them.

        Collective: parameters are gathered one weight file at a time; rank 0 writes. Tensors that did not
        train keep the base's bytes; trained ones are written in the stored dtype.
        """
        base_dir = resolve_checkpoint_dir(self.cfg.model)
        files = CheckpointFiles(base_dir)
        model = engine.module
        if self.cfg.update == "lora":
            items = [(f"{name}.weight", module) for name, module in model.named_modules() if is_lora_layer(module)]
        else:
            items = ffn_parameters(model, self.adapter)
        by_file: dict[str, list[tuple[str, Any]]] = {}
        for name, item in items:
            key = files.key_for(name)
            by_file.setdefault(files.weight_map[key], []).append((key, item))

        def updates():
            for filename in sorted(by_file):
                values: dict[str, torch.Tensor] = {}
                for key, item in by_file[filename]:
                    if self.cfg.update == "lora":
                        with gathered([item.lora_A["default"].weight, item.lora_B["default"].weight]):
                            if dist.is_rank0():
                                values[key] = lora_delta(item)
                    else:
                        with gathered(item):
                            if dist.is_rank0():
                                # Whole tensors: model/ is written from the host. One copy (the gathered
                                # storage is freed when the context ends, so a CPU run needs one too).
                                values[key] = item.detach().to("cpu", copy=True)
                if self.cfg.update == "lora":
                    yield filename, lambda base, values=values: {k: base[k].float() + d for k, d in values.items()}
                else:
                    yield filename, lambda base, values=values: values

        if dist.is_rank0():
            rewrite_checkpoint(base_dir, dest / "model", updates(), provenance=self._provenance())
            stale = dest / PATCH_FILE
            if stale.exists():
                stale.unlink()
                log.warning("removed %s of an earlier run: a %s run writes no patch", stale, self.arm)
            log.info("exported %s (%s: %d tensors changed; no patch file, model/ is the full checkpoint)",
                     dest / "model", self.arm, len(items))
        else:
            for _ in updates():
                pass
        dist.barrier()

    def _write_summary(self, state: dict, total_steps: int, trainable: int, patch: str | None) -> None:
        if not dist.is_rank0():
            return

        ns = self.neuron_set
        summary = {"arm": self.arm, "update": self.cfg.update, "steps": state["step"], "total_steps": total_steps,
                   "world_size": dist.world_size(), "threads": dist.thread_choice(), "total_params": self.total_params, "trainable_params": trainable,
                   "optimizer_params": self.optimizer_params,
                   "trainable_fraction": trainable / self.total_params, "train_seconds": round(state["seconds"], 3),
                   "patch": patch, "neurons": ns.count if ns is not None else None,
                   "neuron_param_fraction": ns.param_fraction if ns is not None else None,
                   "records": len(self.records), "config": asdict(self.cfg), "package_version": shield_ds.__version__,
                   **self.cfg.split_spec.provenance(self.records)}
        if self.random:
            summary["random"] = ns.meta["random"]
        if self.cfg.update == "lora":
            summary["lora"] = self.lora
        if self.self_targets:
            summary["self_targets"] = self.self_targets
        write_json(self.out / "train.json", summary)
        what = (f"{ns.count}{' random' if self.random else ''} neurons" if self.cfg.update in ("mask", "delta")
                else f"the {self.arm} arm")
        print(f"trained {what} ({trainable} = {trainable / self.total_params:.6%} of {self.total_params} parameters) "
              f"for {state['step']} steps on {len(self.records)} records; outputs in {self.out}"
              + ("" if patch else " (no patch file: model/ holds the merged weights)"), flush=True)


def neuron_slice_params(model: torch.nn.Module, adapter, neuron_set) -> int:
    """Parameters in the selected neurons' slices (gate/up rows and their bias entries, down columns)."""
    total = 0
    for _, param, kind, indices in neuron_params(model, adapter, neuron_set):
        shape = param_shape(param)
        total += indices.numel() * (shape[0] if kind == "cols" else shape[1] if len(shape) == 2 else 1)
    return total
