"""`NeuronSet`: the one on-disk format for selected safety neurons.

A neuron set directory holds:
- `neurons.safetensors`: one int64 tensor `layer.{i}` of sorted, unique neuron indices per
  decoder layer (every layer present, possibly empty);
- `neurons.json`: metadata (model path, model_type, config hash, sizes, selection settings,
  parameter fraction, groups, ...).
Identify also writes `stats.safetensors` (the all-reduced statistics `{group}.{stat}` and the
down-projection column norms `down_column_norms`, [layers, width] float64 each: all that selection
reads, so `identify.py --from-stats` can select again without a forward pass) and `sets/<name>/`
(each a neuron set directory).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from shield_ds.errors import ShieldError
from shield_ds.io import atomic_path, write_json

TENSORS_FILE = "neurons.safetensors"
META_FILE = "neurons.json"
STATS_FILE = "stats.safetensors"
NORMS_KEY = "down_column_norms"  # in STATS_FILE beside the statistics
SETS_DIR = "sets"
FORMAT_VERSION = 1


@dataclass
class NeuronSet:
    """Selected neurons per decoder layer plus the metadata that ties them to one model."""

    layers: dict[int, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = {int(i): torch.unique(torch.as_tensor(v, dtype=torch.int64)).sort().values
                       for i, v in self.layers.items()}

    # --- shape facts -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.meta.get("num_layers", len(self.layers)))

    @property
    def intermediate_size(self) -> int:
        return int(self.meta["intermediate_size"])

    @property
    def hidden_size(self) -> int:
        return int(self.meta["hidden_size"])

    @property
    def config_hash(self) -> str | None:
        return self.meta.get("config_hash")

    @property
    def count(self) -> int:
        """Number of selected neurons over all layers."""
        return sum(int(v.numel()) for v in self.layers.values())

    @property
    def param_fraction(self) -> float:
        return float(self.meta.get("param_fraction", 0.0))

    def indices(self, layer: int) -> torch.Tensor:
        return self.layers.get(layer, torch.empty(0, dtype=torch.int64))

    def mask(self, layer: int) -> torch.Tensor:
        """Boolean mask of length intermediate_size for one layer."""
        mask = torch.zeros(self.intermediate_size, dtype=torch.bool)
        mask[self.indices(layer)] = True
        return mask

    def as_pairs(self) -> set[tuple[int, int]]:
        """The set as (layer, neuron) pairs, for overlap arithmetic."""
        return {(layer, int(i)) for layer, idx in self.layers.items() for i in idx.tolist()}

    def per_layer_counts(self) -> list[int]:
        return [int(self.indices(i).numel()) for i in range(self.num_layers)]

    # --- controls ------------------------------------------------------------------------------
    @classmethod
    def random_like(cls, like: "NeuronSet", seed: int, *, source: str | None = None) -> "NeuronSet":
        """A control set: per layer as many neurons as `like`, drawn uniformly without replacement.

        One generator seeded with `seed` draws the layers in index order, so the set depends only on
        (per-layer counts, intermediate size, seed). The metadata keeps what ties `like` to its model
        (sizes, config hash, parameter fraction: the counts are equal) and records
        `random = {"seed", "like"}` (`source`: where `like` came from).
        """
        gen = torch.Generator().manual_seed(int(seed))
        width = like.intermediate_size
        layers = {layer: torch.randperm(width, generator=gen)[:int(like.indices(layer).numel())]
                  for layer in sorted(like.layers)}
        keep = ("num_layers", "intermediate_size", "hidden_size", "config_hash", "model", "model_type",
                "param_fraction", "params_per_neuron", "total_params")
        meta = {k: like.meta[k] for k in keep if k in like.meta}
        meta["random"] = {"seed": int(seed), "like": source}
        return cls(layers, meta)

    # --- validation --------------------------------------------------------------------------
    def validate(self, *, where: str = "neuron set") -> None:
        """Check the indices against the recorded sizes."""
        n_layers, width = self.num_layers, self.intermediate_size
        for layer, idx in self.layers.items():
            if not 0 <= layer < n_layers:
                raise ShieldError(f"{where}: layer {layer} out of range (model has {n_layers} layers)")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= width):
                raise ShieldError(f"{where}: layer {layer} has neuron index {int(idx.max())} out of range "
                                  f"(intermediate size {width})")

    def check_matches(self, config_hash: str, num_layers: int, intermediate_size: int, hidden_size: int,
                      *, where: str = "neuron set", model: str = "model") -> None:
        """Refuse a set that was identified on another model (shapes or config hash differ)."""
        got = (self.num_layers, self.intermediate_size, self.hidden_size)
        want = (num_layers, intermediate_size, hidden_size)
        if got != want:
            raise ShieldError(f"{where} was identified on a model with (layers, intermediate, hidden) = {got}, "
                              f"but {model} has {want}")
        if self.config_hash is not None and self.config_hash != config_hash:
            raise ShieldError(f"{where} was identified on another model (config hash {self.config_hash[:12]} "
                              f"!= {config_hash[:12]} of {model})")
        self.validate(where=where)

    # --- files -------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write neurons.safetensors and neurons.json into `directory` (each atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"layer.{i}": self.indices(i).contiguous() for i in range(self.num_layers)}
        meta = dict(self.meta)
        meta.setdefault("num_layers", self.num_layers)
        meta["format_version"] = FORMAT_VERSION
        meta["selected_neurons"] = self.count
        meta["per_layer"] = self.per_layer_counts()
        with atomic_path(directory / TENSORS_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "shield_ds.neurons", "version": str(FORMAT_VERSION)})
        write_json(directory / META_FILE, meta)

    @classmethod
    def load(cls, directory: str | Path) -> "NeuronSet":
        """Read a neuron set directory (as written by identify); errors name the file."""
        directory = Path(directory)
        tensors_path, meta_path = directory / TENSORS_FILE, directory / META_FILE
        for path in (tensors_path, meta_path):
            if not path.is_file():
                raise ShieldError(f"{path}: not found (is {directory} an identify output directory?)")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ShieldError(f"{meta_path}: unreadable neuron metadata ({exc})") from None
        try:
            tensors = load_file(str(tensors_path))
        except Exception as exc:  # safetensors raises several types for corrupt files
            raise ShieldError(f"{tensors_path}: unreadable neuron file ({exc})") from None
        layers: dict[int, torch.Tensor] = {}
        for key, value in tensors.items():
            prefix, _, num = key.partition(".")
            if prefix != "layer" or not num.isdigit() or value.dtype != torch.int64 or value.dim() != 1:
                raise ShieldError(f"{tensors_path}: unexpected tensor {key!r} ({value.dtype}, {tuple(value.shape)})")
            layers[int(num)] = value
        for key in ("num_layers", "intermediate_size", "hidden_size"):
            if key not in meta:
                raise ShieldError(f"{meta_path}: missing field {key!r}")
        neuron_set = cls(layers, meta)
        neuron_set.validate(where=str(directory))
        return neuron_set

    @staticmethod
    def load_named_sets(directory: str | Path) -> dict[str, "NeuronSet"]:
        """The per-language / per-modality sets stored under `directory/sets/`."""
        root = Path(directory) / SETS_DIR
        if not root.is_dir():
            return {}
        return {p.name: NeuronSet.load(p) for p in sorted(root.iterdir()) if (p / TENSORS_FILE).exists()}
