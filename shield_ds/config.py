"""The options the recipe configs share: typed dataclasses, the one declaration of each option.

The recipe configs (`IdentifyConfig`, `TrainConfig`, `EvalConfig`, `ExperimentConfig`, ...) inherit
`DataConfig` and `EngineConfig`/`InferenceConfig`; `shield_ds.cli` builds the command line and the
YAML presets from them. What the parser reads from a field: its type (a `Literal` gives the choices,
`list[...]` takes `a,b`, `a b` or a repeated flag), its default and `metadata`: `help`, `aliases`,
`metavar`, and `commas: False` for lists whose items may hold commas (paths, KEY=VALUE).
Construction checks every `Literal` field, so library callers get the same choices as the CLI.
"""

from __future__ import annotations

import functools
import types
import typing
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, Literal, Sequence

from shield_ds.errors import ShieldError
from shield_ds.data import load_labeled
from shield_ds.data.splits import SplitSpec
from shield_ds.defaults import default_model_dir

# Leaf names of the decoder-layer projections LoRA adapts unless --lora-targets says otherwise
# (attention and MLP, what LoRA users pick); the train recipe and the memory planner both use it.
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")

Modality = Literal["text", "image", "typographic"]
# Data options added after outputs were first written, with the value an output that predates them ran with
# (identify's reuse check and train's resume check read a missing entry as this value).
LATER_DATA_OPTIONS = {"benign_per_group_limit": None, "validation_fraction": 0.0, "benign_mix": []}
Split = Literal["train", "validation", "test", "all"]


def option(default: Any = MISSING, help: str | None = None, **metadata: Any) -> Any:
    """A dataclass field with its command-line help; a list default is copied for each instance."""
    if help is not None:
        metadata["help"] = help
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def redefault(cls: type, name: str, default: Any) -> Any:
    """The field `name` of `cls` with another default (a recipe's own default of a shared option)."""
    base: Field = cls.__dataclass_fields__[name]
    return option(default, **dict(base.metadata))


def csv_list(text: str | Sequence[str] | None) -> list[str] | None:
    """'en,zh' or ['en','zh'] -> ['en','zh']; None/'' -> None."""
    if text is None:
        return None
    items = text.split(",") if isinstance(text, str) else [str(t) for t in text]
    items = [t.strip() for t in items if t.strip()]
    return items or None


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); any other type -> (type, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


@functools.cache
def _choices(cls: type) -> dict[str, tuple[tuple, bool]]:
    """Field name -> (allowed values, whether a list) for the Literal fields of `cls`."""
    hints = typing.get_type_hints(cls)
    found = {}
    for f in fields(cls):
        tp, _ = unwrap_optional(hints[f.name])
        is_list = typing.get_origin(tp) is list
        item = typing.get_args(tp)[0] if is_list else tp
        if typing.get_origin(item) is Literal:
            found[f.name] = (typing.get_args(item), is_list)
    return found


def check_choices(cfg: Any) -> None:
    """Raise a ShieldError naming the option when a Literal field holds another value."""
    for name, (allowed, is_list) in _choices(type(cfg)).items():
        value = getattr(cfg, name)
        for item in (value or []) if is_list else [value]:
            if item is not None and item not in allowed:
                raise ShieldError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, not {item!r}")


def default_model_path() -> str:
    """The embedded default model (the tiny llava checkpoint, built on first use by the recipes)."""
    return str(default_model_dir())


@dataclass
class ModelConfig:
    """The checkpoint a recipe runs on."""

    model: str = field(default_factory=default_model_path, metadata={
        "help": "checkpoint directory or hub name (default: the tiny llava demo model, built on first use)"})

    def __post_init__(self) -> None:
        check_choices(self)


@dataclass
class EngineConfig(ModelConfig):
    """How the model runs: the DeepSpeed config and its overrides."""

    ds_config: str | None = option("ds_configs/zero3_infer.json", "DeepSpeed JSON; for inference also 'none': "
                                   "plain PyTorch (a replica per rank, as --zero off)")
    ds_overrides: list[str] = option([], "override a ds_config entry, e.g. --ds zero_optimization.offload_param."
                                     "device=cpu (repeatable)", aliases=["--ds"], metavar="KEY=VALUE", commas=False)
    cpu_threads: int | None = option(None, "intra-op CPU threads per rank (default: OMP_NUM_THREADS when set; else "
                                     "on a CPU backend the cores of the node over its ranks, on GPU torch's default)",
                                     metavar="N")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ShieldError(f"--cpu-threads must be at least 1, not {self.cpu_threads}")
        if isinstance(self.ds_config, str) and self.ds_config.lower() == "none":
            self.ds_config = None


@dataclass
class InferenceConfig(EngineConfig):
    """Inference recipes (identify, evaluate) also choose between ZeRO-3 and a replica per rank."""

    zero: Literal["auto", "on", "off"] = option(
        "auto", "on: ZeRO-3 partitioned model (the ds_config's engine); off: a plain replica of the model on every "
        "rank, prompts sharded, results gathered; auto: off when the model fits in one device's memory, else on")


@dataclass
class DataConfig:
    """The prompts a recipe reads (shield_ds.data.load_labeled)."""

    harmful: list[str] = option(["multijail"], "harmful prompts: files, hub datasets or builtin names (repeatable)",
                                metavar="SOURCE", commas=False)
    benign: list[str] = option(["multiq", "requests"], "benign prompts (repeatable): the default pairs MultiQ's "
                               "questions with the shipped requests and borderline prompts, the forms of the "
                               "harmful side", metavar="SOURCE", commas=False)
    benign_mix: list[str] = option([], "share of each --benign source in the benign per-group limit, SOURCE=WEIGHT "
                                   "(default: equal shares)", metavar="SOURCE=WEIGHT")
    languages: list[str] | None = option(None, "comma-separated ISO 639-1 codes (default: all in the data)")
    modalities: list[Modality] = option(["text"], "comma-separated: text, image, typographic")
    image: str | None = option(None, "image file for the 'image' modality view")
    per_group_limit: int | None = option(None, "at most N records per label x language x modality")
    benign_per_group_limit: int | None = option(None, "at most N benign records per language x modality "
                                                "(default: --per-group-limit), e.g. more benign than harmful")
    seed: int = option(0, "seed of the record sampling")
    split: Split = option("train", "which prompts: the train, validation or test split by prompt id (the same "
                          "in every language and view), or all")
    test_fraction: float = option(0.3, "share of prompts in the test split")
    validation_fraction: float = option(0.0, "share of prompts in a validation split, taken from the train "
                                        "split (the test split stays the same); every stage of a run needs the same")
    split_seed: int = option(0, "seed of the train/validation/test split")
    data_dir: str | None = option(None, "where the builtin datasets live (default: ../shared/data)")

    def load_records(self, require: Sequence[str] = ("harmful",), evaluation: bool = False) -> list:
        """The harmful and benign records these flags name (`shield_ds.data.load_labeled`); `evaluation`: an
        evaluation may read the evaluation-only sources."""
        return load_labeled(self.harmful, self.benign, modalities=self.modalities, languages=self.languages,
                            image=self.image, per_group_limit=self.per_group_limit,
                            benign_per_group_limit=self.benign_per_group_limit, seed=self.seed,
                            data_dir=self.data_dir, require=require, split=self.split_spec,
                            benign_mix=self.benign_mix, evaluation=evaluation)

    @property
    def split_spec(self):
        """`--split`, `--test-fraction`, `--validation-fraction` and `--split-seed` as one checked `SplitSpec`."""
        return SplitSpec(self.split, self.test_fraction, self.validation_fraction, self.split_seed)
