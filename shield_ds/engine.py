"""The one DeepSpeed wrapper: distributed init, ds_config resolution, initialize, checkpoints.

Recipes never call `deepspeed.*` directly; they go through this module so that batch-size
arithmetic, dtype choice, ZeRO-3 parameter gathering and checkpoint layout live in one place.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch

from shield_ds import dist
from shield_ds.errors import ShieldError
from shield_ds.io import read_json, read_mapping, write_json
from shield_ds.zero_internals import full_numel
from shield_ds.loss import response_loss, response_window
from shield_ds.masking import GradientMasker, build_masks, delta_masks
from shield_ds.models import count_parameters, load_model
from shield_ds.patch import resolve_checkpoint_dir
from shield_ds.trainable import setup_trainable

log = dist.get_logger("engine")

COMPLETE_MARKER = "COMPLETE"
RUN_INFO_FILE = "run_info.json"  # beside a checkpoint: what the run that wrote it was (see save_checkpoint)
DS_CONFIG_DIR = Path(__file__).resolve().parent / "ds_configs"  # package data; <checkout>/ds_configs links here


# --- ds_config ---------------------------------------------------------------------------------
def load_ds_config(path_or_dict: str | os.PathLike | dict) -> dict:
    """Read a DeepSpeed JSON config: a path, or a shipped config by name (`zero3_fp32.json`) or as
    `ds_configs/NAME` from any working directory; errors name the file."""
    if isinstance(path_or_dict, dict):
        return copy.deepcopy(path_or_dict)
    path = Path(path_or_dict)
    if not path.exists():
        shipped = DS_CONFIG_DIR / (path.name if path.parent == Path("ds_configs") else path)
        path = shipped if shipped.exists() else path
    return read_mapping(path, "DeepSpeed config")


def _set_dotted(config: dict, dotted: str, value: Any) -> None:
    node = config
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`zero_optimization.stage=3` -> ("zero_optimization.stage", 3) (values parsed as JSON when possible)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ShieldError(f"ds override {text!r}: expected KEY.PATH=VALUE")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def _find_auto(node: Any, path: str = "") -> str | None:
    if isinstance(node, dict):
        for key, value in node.items():
            found = _find_auto(value, f"{path}.{key}" if path else key)
            if found:
                return found
    elif isinstance(node, str) and node == "auto":
        return path
    return None


def resolve_ds_config(config: str | os.PathLike | dict, *, micro_batch_size: int, grad_accum: int = 1,
                      world_size: int | None = None, lr: float | None = None,
                      overrides: Iterable[str] | dict[str, Any] | None = None, source: str | None = None) -> dict:
    """A ds_config with batch sizes computed here (no unresolved "auto") and overrides applied."""
    cfg = load_ds_config(config)
    source = source or (str(config) if not isinstance(config, dict) else "ds_config")
    world = world_size if world_size is not None else dist.world_size()
    cfg["train_micro_batch_size_per_gpu"] = int(micro_batch_size)
    cfg["gradient_accumulation_steps"] = int(grad_accum)
    cfg["train_batch_size"] = int(micro_batch_size) * int(grad_accum) * int(world)
    if lr is not None and isinstance(cfg.get("optimizer"), dict):
        cfg["optimizer"].setdefault("params", {})["lr"] = float(lr)
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in (overrides or [])]
    for key, value in items:
        _set_dotted(cfg, key, value)
    optimizer = cfg.get("optimizer")
    if isinstance(optimizer, dict) and str(optimizer.get("type", "")).lower().startswith("adam") \
            and not torch.cuda.is_available():
        # DeepSpeed's fused Adam needs CUDA: on a CPU-only machine torch's Adam, unless the config chose.
        optimizer.setdefault("params", {}).setdefault("torch_adam", True)
    auto = _find_auto(cfg)
    if auto:
        raise ShieldError(f"{source}: '{auto}' is \"auto\"; shield-ds computes batch sizes itself, "
                          f"set a value or remove the key")
    return cfg


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def config_dtype(ds_config: dict) -> torch.dtype:
    """The parameter dtype a ds_config trains/infers in."""
    if ds_config.get("bf16", {}).get("enabled", False) is True:
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled", False) is True:
        return torch.float16
    return torch.float32


def fits_replicated(checkpoint_dir: str | os.PathLike, dtype: torch.dtype, share: float = 0.4) -> bool:
    """Whether a full copy of the checkpoint's weights in `dtype` fits in `share` of this rank's free
    device memory (GPU: the rank's device; CPU: host memory split over the node's ranks).

    Used to run generation on a plain replica instead of under ZeRO-3, where every new token gathers
    every layer's parameters again. Unknown sizes (no local safetensors) count as not fitting.
    """
    files = list(Path(checkpoint_dir).glob("*.safetensors")) if Path(checkpoint_dir).is_dir() else []
    if not files:
        return False
    from safetensors import safe_open

    elements = 0
    for file in files:
        with safe_open(str(file), "pt") as f:
            elements += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    need = elements * torch.tensor([], dtype=dtype).element_size()
    if torch.cuda.is_available():
        free = torch.cuda.mem_get_info(dist.device())[0]
    else:
        import psutil

        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size()))
        free = psutil.virtual_memory().available // max(local_ranks, 1)
    return need <= share * free


def replica_fits_on_every_rank(model: str | os.PathLike, dtype: torch.dtype) -> bool:
    """`fits_replicated` for a model name or directory, agreed by all ranks (a collective: call it on every rank).

    Free memory differs between ranks, and a rank that takes the replica path while another takes ZeRO-3
    would wait forever in the next collective; so one "no" anywhere is "no" everywhere.
    """
    try:
        fits = fits_replicated(resolve_checkpoint_dir(model), dtype)
    except ShieldError:
        fits = False  # a hub name outside the local cache: size unknown
    return bool(dist.all_reduce(torch.tensor([int(fits)]), op="min")[0])


# --- inference: ZeRO-3 or a replica per rank --------------------------------------------------
ZERO_MODES = ("auto", "on", "off")


def offloads_params(ds_config: dict | None) -> bool:
    """Whether the ds_config offloads ZeRO-3 parameters (to CPU or NVMe)."""
    offload = (ds_config or {}).get("zero_optimization", {}).get("offload_param") or {}
    return str(offload.get("device", "none")).lower() not in ("none", "")


def choose_zero(zero: str, ds_config: dict | None, model: str | os.PathLike, dtype: torch.dtype) -> str:
    """Resolve an inference recipe's `--zero auto|on|off` to "on" or "off"; the same on every rank.

    "on": the ds_config's DeepSpeed engine (ZeRO-3 partitioned: every forward gathers every layer);
    "off": a plain replica of the model on every rank, no DeepSpeed engine. `ds_config` None
    (`--ds-config none`) means off. "auto" is off when the whole model fits in one device's memory
    (`fits_replicated`, all ranks agreeing) and the ds_config offloads no parameters, else on.
    """
    if zero not in ZERO_MODES:
        raise ShieldError(f"--zero must be one of {', '.join(ZERO_MODES)}, not {zero!r}")
    if ds_config is None:
        if zero == "on":
            raise ShieldError("--zero on needs a DeepSpeed config (--ds-config none runs a plain replica)")
        return "off"
    if zero == "off" and offloads_params(ds_config):
        raise ShieldError("--zero off keeps a full replica on every device; it cannot offload parameters "
                          "(drop --offload-params / offload_param, or use --zero on)")
    if zero != "auto":
        return zero
    if offloads_params(ds_config):
        return "on"
    fits = replica_fits_on_every_rank(model, dtype)
    mode = "off" if fits else "on"
    log.info("--zero auto: %s (%s)", mode, "a replica fits on every rank" if fits else "the model needs ZeRO-3")
    return mode


# --- the engine --------------------------------------------------------------------------------
# "infer": eval mode, no gradients (identify, evaluate); the others train (ShieldTrainer's --update, and
# "full", every parameter, a benchmark baseline).
MODES = ("infer", "mask", "delta", "lora", "full-ffn", "full")
MASKED_MODES = ("mask", "delta")


def check_mode(mode: str) -> None:
    """A ShieldError unless `mode` is one of MODES (`load` checks before loading the model)."""
    if mode not in MODES:
        raise ShieldError(f"engine mode must be one of {', '.join(MODES)}, not {mode!r}")


class ShieldEngine:
    """A model loaded and wrapped for one mode: the whole ZeRO-3 lifecycle in one place.

    `ShieldEngine.load` orders it: the HfDeepSpeedConfig before from_pretrained (the model is built
    partitioned), freezing / delta slices / LoRA / full-FFN selection, deepspeed.initialize, and in
    mask and delta mode the `GradientMasker`; `train_step` is the masked step the trainer (and the
    benchmarks) run. Inference with `zero="off"` keeps a plain replica on this rank's device
    (`ds` is None). Also saves and loads complete-or-absent checkpoints.
    """

    def __init__(self, loaded: Any, ds_config: dict | None, *, mode: str = "infer", neuron_set: Any = None,
                 lora: Any = None, lr_scheduler: Any = None, gradient_checkpointing: bool = False):
        """Wrap an already loaded model (`shield_ds.models.LoadedModel`); prefer `ShieldEngine.load`."""
        import deepspeed


        check_mode(mode)
        self.mode, self.loaded = mode, loaded
        self.dtype = config_dtype(ds_config) if ds_config else torch.float32
        model = loaded.model
        self.total_params = count_parameters(model)  # before LoRA adds its own
        self.lora: dict[str, Any] | None = None
        self.masker = None
        self.ds = self.optimizer = self.lr_scheduler = None
        training = mode != "infer"
        if not training:
            for p in model.parameters():
                p.requires_grad_(False)
        else:
            if gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

            self.lora = setup_trainable(model, loaded.adapter, mode, neuron_set, lora)
        if ds_config is None:  # inference on a plain replica
            if training:
                raise ShieldError(f"mode {mode} needs a DeepSpeed config")
            self.ds_config = None
            self.module: torch.nn.Module = model.eval().to(dist.device())
            self.device = dist.device()
            return
        params = [p for p in model.parameters() if p.requires_grad] if training else None
        if training and not params:
            raise ShieldError("no trainable parameters (is the neuron set empty?)")
        if not training:
            # A training ds_config reused for inference: no optimizer (it would be built over frozen weights).
            ds_config = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
        self.ds_config = ds_config
        self.ds, self.optimizer, _, self.lr_scheduler = deepspeed.initialize(
            model=model, model_parameters=params, lr_scheduler=lr_scheduler, config=ds_config,
            dist_init_required=False)
        self.module = self.ds.module
        self.device = self.ds.device
        if not training:
            self.module.eval()
        elif mode in MASKED_MODES:
            masks = (build_masks(self.module, loaded.adapter, neuron_set) if mode == "mask"
                     else delta_masks(self.module))
            self.masker = GradientMasker(self.ds, masks)

    @classmethod
    def load(cls, model: str | os.PathLike, ds_config: dict | None, *, mode: str = "infer", zero: str = "on",
             neuron_set: Any = None, lora: Any = None, lr_scheduler: Any = None,
             gradient_checkpointing: bool = False) -> "ShieldEngine":
        """Load checkpoint `model` and wrap it for `mode` (see MODES).

        Inference: `zero` is the recipes' `--zero auto|on|off` (`choose_zero`): "on" runs the ds_config's
        DeepSpeed engine (ZeRO-3 partitioned when it says stage 3), "off" a plain replica per rank; both
        give results identical to one process. Training modes need a ZeRO-3 ds_config; mask and delta
        need `neuron_set`, lora `lora` (`shield_ds.trainable.LoraSettings`); `lr_scheduler` is passed to
        deepspeed.initialize (a callable of the optimizer).
        """
        check_mode(mode)
        dtype = config_dtype(ds_config) if ds_config else torch.float32
        if mode == "infer" and choose_zero(zero, ds_config, model, dtype) == "off":
            return cls(load_model(model, dtype=dtype), None, mode=mode)
        if mode != "infer" and (ds_config is None or zero_stage(ds_config) != 3):
            raise ShieldError(f"training mode {mode} needs a DeepSpeed config with ZeRO stage 3")
        # Under ZeRO-3 the loader creates the HfDeepSpeedConfig first, so the model is built partitioned;
        # the LoadedModel keeps it alive through deepspeed.initialize.
        loaded = load_model(model, ds_config=ds_config if zero_stage(ds_config) == 3 else None, dtype=dtype)
        return cls(loaded, ds_config, mode=mode, neuron_set=neuron_set, lora=lora, lr_scheduler=lr_scheduler,
                   gradient_checkpointing=gradient_checkpointing)

    # --- inference -----------------------------------------------------------------------------
    @property
    def zero(self) -> str:
        """"on" (a DeepSpeed engine) or "off" (a plain replica)."""
        return "off" if self.ds is None else "on"

    @property
    def zero3(self) -> bool:
        """Whether the parameters are ZeRO-3 partitioned (generation must then run with synced_gpus)."""
        return self.ds is not None and zero_stage(self.ds_config) == 3

    def __call__(self, **inputs: Any) -> Any:
        return (self.module if self.ds is None else self.ds)(**inputs)

    # --- training ------------------------------------------------------------------------------
    def train_step(self, batch: Any, logits_window: bool = True) -> tuple[torch.Tensor, bool]:
        """One micro-batch of training (a collated `shield_ds.data.Batch` on this engine's device): forward,
        the weighted response loss, backward, then `step`. Returns the per-sample losses (detached) and
        whether an optimizer step was taken (the accumulation boundary). `logits_window` False computes
        logits on every position (the same loss; the benchmark's baseline)."""
        keep = response_window(batch.labels) if logits_window else batch.labels.shape[1]
        logits = self.ds(**batch.inputs, use_cache=False, logits_to_keep=keep).logits
        per_sample = response_loss(logits, batch.labels[:, -keep:])
        self.ds.backward((per_sample * batch.weights).sum() / len(per_sample))
        return per_sample.detach(), self.step()

    def is_accumulation_boundary(self) -> bool:
        """Whether the current micro-batch ends an accumulation window (valid before its forward too)."""
        return self.ds.is_gradient_accumulation_boundary()

    def step(self) -> bool:
        """The masked step: at the accumulation boundary mask the gradient partitions (mask and delta
        mode), then DeepSpeed's step (norm, clipping, optimizer only at the boundary). Returns whether
        this was the boundary. Collective."""
        boundary = self.ds.is_gradient_accumulation_boundary()
        if boundary and self.masker is not None:
            self.masker.apply()
        self.ds.step()
        return boundary

    def grad_norm(self) -> float | None:
        """The gradient norm of the last optimizer step (before clipping): inside the mask in mask and delta
        mode, DeepSpeed's global norm otherwise."""
        if self.masker is not None:
            return self.masker.masked_grad_norm()
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    def remove_masker(self) -> None:
        """Take the gradient mask off and give the weight decay back to the optimizer (before a final export)."""
        if self.masker is not None:
            self.masker.remove()
            self.masker = None

    def optimizer_params(self) -> int:
        """Parameters the optimizer holds (full sizes under ZeRO-3)."""
        return sum(full_numel(p) for p in self.module.parameters() if p.requires_grad)

    def destroy(self) -> None:
        """Remove DeepSpeed's hooks and buffers (so another engine can be built in this process)."""
        self.remove_masker()
        if self.ds is not None and hasattr(self.ds, "destroy"):
            self.ds.destroy()

    # --- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, ckpt_dir: str | os.PathLike, step: int, client_state: dict[str, Any],
                        keep_last: int | None = None, run_info: dict[str, Any] | None = None) -> Path:
        """Save tag `step-N`; a checkpoint counts only once its COMPLETE marker exists.

        `run_info` (JSON) is written beside it before the marker, so a resume can read it without
        loading the checkpoint (`read_run_info`).
        """
        ckpt_dir = Path(ckpt_dir)
        tag = f"step-{step:08d}"
        if dist.is_rank0():
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
        dist.barrier()
        self.ds.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        dist.barrier()
        if dist.is_rank0():
            if run_info is not None:
                write_json(ckpt_dir / tag / RUN_INFO_FILE, run_info)
            (ckpt_dir / tag / COMPLETE_MARKER).write_text(f"{step}\n")
            if keep_last:
                for old in complete_checkpoints(ckpt_dir)[:-keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return ckpt_dir / tag

    def load_checkpoint(self, ckpt_dir: str | os.PathLike) -> dict[str, Any] | None:
        """Load the newest complete checkpoint; returns its client state, or None if there is none."""
        found = complete_checkpoints(ckpt_dir)
        if not found:
            return None
        tag_dir = found[-1]
        load_path, client_state = self.ds.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                          load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise ShieldError(f"{tag_dir}: checkpoint could not be loaded")
        log.info("resumed from %s", tag_dir)
        return client_state


def read_run_info(tag_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The `run_info` saved with a checkpoint, or None (written without one)."""
    path = Path(tag_dir) / RUN_INFO_FILE
    return read_json(path) if path.is_file() else None


def complete_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint tag directories, oldest first (partial ones are ignored)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    tags = [p for p in ckpt_dir.iterdir() if p.is_dir() and re.fullmatch(r"step-\d+", p.name)
            and (p / COMPLETE_MARKER).exists()]
    return sorted(tags, key=lambda p: p.name)
