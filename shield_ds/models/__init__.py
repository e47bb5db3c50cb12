"""Model layer: family adapters (where FFNs, neurons and the vision tower live), the loader,
and tiny random checkpoints for tests."""

from .adapters import (SUPPORTED_FAMILIES, TEXT_ONLY_FAMILIES, FamilyAdapter, FFNProjections, get_adapter,
                       unwrap_model)
from .loader import (LoadedModel, config_hash, count_parameters, load_config, load_model, load_processor,
                     param_shape)

__all__ = [
    "SUPPORTED_FAMILIES", "TEXT_ONLY_FAMILIES", "FamilyAdapter", "FFNProjections", "get_adapter", "unwrap_model",
    "LoadedModel", "config_hash", "count_parameters", "load_config", "load_model", "load_processor", "param_shape",
]
