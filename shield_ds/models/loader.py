"""Load a vision-language or decoder-only checkpoint with its processor (the tokenizer for a
decoder-only model) and family adapter.

Under ZeRO-3 the model is created partitioned (deepspeed.zero.Init through transformers'
HfDeepSpeedConfig), so no rank ever holds the whole model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor,
                          AutoTokenizer, PretrainedConfig)

from shield_ds.dist import get_logger
from shield_ds.errors import ShieldError, first_line

from .adapters import TEXT_ONLY_FAMILIES, FamilyAdapter, get_adapter
from shield_ds.zero_internals import full_numel, full_shape

log = get_logger("models")

# Config fields that say nothing about the network's shape or behaviour: left out of config_hash.
# `architectures` is ignored too, so a checkpoint saved through another head class of the same
# network (e.g. ...ForConditionalGeneration vs the bare ...Model) hashes the same; keys starting
# with "_" (_name_or_path, _attn_implementation_*, _commit_hash) are transformers' bookkeeping.
VOLATILE_CONFIG_KEYS = frozenset({
    "transformers_version", "architectures", "dtype", "torch_dtype", "use_cache", "output_attentions",
    "output_hidden_states", "return_dict",
})


@dataclass
class LoadedModel:
    model: nn.Module
    processor: Any
    adapter: FamilyAdapter
    config: PretrainedConfig
    path: str
    hf_ds_config: object | None = None  # HfDeepSpeedConfig; transformers keeps only a weak reference


def load_config(path_or_name: str | Path) -> PretrainedConfig:
    """The checkpoint's config; a ShieldError naming the path when it is missing or unreadable."""
    try:
        return AutoConfig.from_pretrained(str(path_or_name))
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise ShieldError(f"cannot read a model config from {path_or_name}: {first_line(exc)}") from exc


def _text_only(config: PretrainedConfig) -> bool:
    return getattr(config, "model_type", None) in TEXT_ONLY_FAMILIES


def _auto_processor(path: str, text_only: bool):
    """AutoProcessor, or for a decoder-only model its tokenizer (given a pad token: EOS if it has none)."""
    if not text_only:
        return AutoProcessor.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_processor(path_or_name: str | Path, config: PretrainedConfig | None = None):
    """The checkpoint's processor (tokenizer, image processor, chat template); the tokenizer alone
    for a decoder-only model."""
    if config is None:
        try:
            config = AutoConfig.from_pretrained(str(path_or_name))
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            config = None  # AutoProcessor reports what is missing
    try:
        return _auto_processor(str(path_or_name), config is not None and _text_only(config))
    except (OSError, ValueError) as exc:
        raise ShieldError(f"cannot load a processor from {path_or_name}: {first_line(exc)}") from exc


def _zero_stage(ds_config: dict | None) -> int:
    if not ds_config:
        return 0
    return int((ds_config.get("zero_optimization") or {}).get("stage", 0) or 0)


def _zero3_still_enabled() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())


def import_model_classes(config: PretrainedConfig, auto_class: type) -> None:
    """Import the modeling modules of `config` and of every sub-config before zero.Init starts.

    A class defined while zero.Init is active has its `__init__` captured by DeepSpeed's subclass hook
    before any class decorator runs, and restored to that undecorated `__init__` on exit; transformers'
    hub-kernel decorators (`kernels` package) then leave layers without the state their forward needs
    (`'LlamaAttention' object has no attribute '_kernel_funcs'`). Sub-models (a VLM's language model) are
    otherwise imported lazily inside the outer model's `__init__`, i.e. inside zero.Init.
    """
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    pending, seen = [(config, auto_class._model_mapping)], set()
    while pending:
        cfg, mapping = pending.pop()
        if id(cfg) in seen:
            continue
        seen.add(id(cfg))
        try:
            mapping[type(cfg)]  # the lazy mapping imports the class's module
        except KeyError:
            pass
        for key in getattr(cfg, "sub_configs", {}) or {}:
            sub = getattr(cfg, key, None)
            if isinstance(sub, PretrainedConfig):
                pending.append((sub, MODEL_MAPPING))


def load_model(path_or_name: str | Path, *, ds_config: dict | None = None,
               dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load model, processor and adapter from a checkpoint directory or hub name.

    With a ZeRO-3 `ds_config` (batch sizes resolved, no "auto" left) the model is built
    partitioned across ranks; keep the returned LoadedModel (it holds the HfDeepSpeedConfig)
    alive until deepspeed.initialize has run.
    """
    path = str(path_or_name)
    config = load_config(path)
    adapter = get_adapter(config)
    hf_ds_config = None
    if _zero_stage(ds_config) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        # Must exist before from_pretrained: it makes transformers build the model under zero.Init.
        hf_ds_config = HfDeepSpeedConfig(ds_config)
    elif _zero3_still_enabled():
        log.warning("a ZeRO-3 HfDeepSpeedConfig from an earlier load is still alive: %s will be loaded "
                    "partitioned too", path)
    try:
        processor = _auto_processor(path, _text_only(config))
        auto_class = AutoModelForCausalLM if _text_only(config) else AutoModelForImageTextToText
        import_model_classes(config, auto_class)
        model = auto_class.from_pretrained(path, config=config, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ShieldError(f"cannot load model or processor from {path}: {first_line(exc)}") from exc
    log.info("loaded %s (%s, %d parameters%s)", path, adapter.model_type, count_parameters(model),
             ", ZeRO-3 partitioned" if hf_ds_config is not None else "")
    return LoadedModel(model=model, processor=processor, adapter=adapter, config=model.config, path=path,
                       hf_ds_config=hf_ds_config)


def _without_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_volatile(item) for key, item in value.items()
                if key not in VOLATILE_CONFIG_KEYS and not str(key).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_without_volatile(item) for item in value]
    return value


def config_hash(config: PretrainedConfig) -> str:
    """sha256 of the config's JSON (sorted keys) without VOLATILE_CONFIG_KEYS and '_' keys.

    Equal for the same network saved, reloaded, renamed or loaded in another dtype.
    """
    content = _without_volatile(config.to_dict())
    text = json.dumps(content, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def param_shape(param: torch.Tensor) -> torch.Size:
    """The full shape of a parameter, also when ZeRO-3 has partitioned it away."""
    return full_shape(param)


def count_parameters(model: nn.Module) -> int:
    """Total parameter count (full sizes under ZeRO-3 partitioning; shared weights once)."""
    return sum(full_numel(param) for param in model.parameters())
