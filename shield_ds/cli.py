"""The recipes' command line: one parser per config dataclass, for flags and YAML presets alike.

    cfg = parse_config(TrainConfig, argv, embedded_default="train")

Each option is one field of the dataclass (shield_ds/config.py says what a field declares);
`transformers.HfArgumentParser` turns the fields into flags. `--config FILE.yaml` presets options
(keys are flag names, with `-` or `_`) and flags override it. A YAML entry is parsed as the flag it
names, so presets get the same conversion and checks as the command line. Precedence: field
defaults < YAML < flags. With neither `--model` nor `--config`, a recipe with an embedded default
reads configs/default/<recipe>.yaml (and runs on the tiny demo model). Bad input is one line
(a ShieldError; a YAML value's names the file).

Only the recipes import this module; the library takes the config objects.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar

from transformers import HfArgumentParser

from shield_ds.config import default_model_path, unwrap_optional
from shield_ds.errors import ShieldError
from shield_ds.io import read_mapping
from shield_ds import dist
from shield_ds.models.tiny import default_model
from shield_ds.process_group import init_distributed

T = TypeVar("T")

EMBEDDED_DEFAULTS = Path(__file__).resolve().parent / "recipe_defaults"  # package data; configs/default links here
_GIVEN = "_given"  # namespace attribute: the list options already set in the source being parsed


def _item(kind: Any, text: str, action: argparse.Action) -> Any:
    """Convert one list item the way argparse converts a scalar flag's value."""
    if typing.get_origin(kind) is Literal:
        allowed = typing.get_args(kind)
        if text not in allowed:
            raise argparse.ArgumentError(action, f"invalid choice: {text!r} (choose from {', '.join(map(repr, allowed))})")
        return text
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentError(action, f"invalid {kind.__name__} value: {text!r}") from None


class ListAction(argparse.Action):
    """A list option: `--x a b --x c` -> [a, b, c] and `--x a,b` -> [a, b] (unless `commas=False`).
    Its first use in a source (the YAML file, then the command line) replaces the value before."""

    def __init__(self, option_strings, dest, type=str, commas: bool = True, optional: bool = False, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.kind, self.commas, self.optional = type, commas, optional

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault(_GIVEN, set())
        items = list(getattr(namespace, self.dest) or []) if self.dest in given else []
        given.add(self.dest)
        for value in values:
            parts = value.split(",") if self.commas else [value]
            items += [_item(self.kind, part.strip(), self) for part in parts if part.strip()]
        setattr(namespace, self.dest, items if items or not self.optional else None)


class ConfigParser(HfArgumentParser):
    """HfArgumentParser whose list fields use ListAction and whose errors are ShieldErrors."""

    def __init__(self, cls: type, description: str | None = None):
        class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
            pass

        self.source = ""  # prefixed to error messages: the YAML file being parsed
        super().__init__(cls, description=description, formatter_class=Formatter)
        self.add_argument("--config", type=Path, default=None, help="YAML file whose keys preset the options")
        # The deepspeed launcher passes --local_rank (LOCAL_RANK is in the environment as well).
        self.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
        for action in self._actions:  # --micro-batch-size before --micro_batch_size in help and errors
            action.option_strings.sort(key=lambda flag: "_" in flag)
        self.fields = {f.name for f in dataclasses.fields(cls)}
        self.required_actions = [a for a in self._actions if a.required]
        for action in self.required_actions:  # checked once both sources are parsed (a YAML file may give them)
            action.required = False

    @staticmethod
    def _parse_dataclass_field(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
        metadata = dict(field.metadata)
        commas = metadata.pop("commas", True)
        kind, optional = unwrap_optional(field.type)
        if typing.get_origin(kind) is list:
            metadata.setdefault("action", ListAction)
            metadata.update(commas=commas, optional=optional)
        field = copy.copy(field)
        field.metadata = types.MappingProxyType(metadata)
        HfArgumentParser._parse_dataclass_field(parser, field)

    def error(self, message: str) -> typing.NoReturn:
        raise ShieldError(f"{self.source}{message}")

    def find(self, key: str) -> tuple[argparse.Action, str] | None:
        """The action and option string a YAML key names (`micro_batch_size`, `batch-size`, `no_export`)."""
        for spelling in (f"--{key}", f"--{key.replace('_', '-')}"):
            action = self._option_string_actions.get(spelling)
            if action is not None and action.dest in self.fields:
                return action, spelling
        return None

    def yaml_args(self, path: Path) -> list[str]:
        """The YAML file's entries as the flags they name: `ratio: 0.5` -> `--ratio=0.5`."""
        data = read_mapping(path, "config file")
        args: list[str] = []
        for key, value in data.items():
            found = self.find(str(key))
            if found is None:
                raise ShieldError(f"{path}: unknown key {key!r}")
            action, flag = found
            if value is None:  # null: the option's default
                continue
            if isinstance(value, dict):
                raise ShieldError(f"{path}: {key}: expected a value or a list, not a mapping")
            if isinstance(value, list):
                if not isinstance(action, ListAction):
                    raise ShieldError(f"{path}: {key}: expected one value, not a list")
                args += [f"{flag}={_text(v)}" for v in value] or [f"{flag}="]
            elif action.nargs == 0:  # a switch such as --no-export
                args += [flag] if _switch(path, key, value) else []
            else:
                args.append(f"{flag}={_text(value)}")
        return args

    def parse(self, argv: Sequence[str], preset: Path | None) -> argparse.Namespace:
        """Parse the YAML preset (if any), then `argv` on top of it."""
        namespace = argparse.Namespace()
        if preset is not None:
            self.source = f"{preset}: "
            namespace = self.parse_args(self.yaml_args(preset))
            self.source = ""
            namespace.__dict__.pop(_GIVEN, None)
        namespace = self.parse_args(list(argv), namespace=namespace)
        missing = [a.option_strings[0] for a in self.required_actions if getattr(namespace, a.dest, None) is None]
        if missing:
            self.error(f"the following arguments are required: {', '.join(missing)}")
        return namespace


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _switch(path: Path, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ShieldError(f"{path}: {key}: expected true or false, not {value!r}")
    return value


def _gives(argv: Sequence[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(flag + "=") for arg in argv)


def read_config(cls: type[T], argv: Sequence[str], *, embedded_default: str | None = None,
                description: str | None = None) -> tuple[T, str]:
    """Parse flags (and the `--config` YAML) into a `cls`, with no side effects; also say where the values
    came from. `embedded_default`: the recipe's configs/default/<name>.yaml, read when neither --model
    nor --config is given."""
    argv = list(argv)
    parser = ConfigParser(cls, description)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", type=Path, default=None)
    preset = pre.parse_known_args(argv)[0].config
    where = f"{preset} and flags" if preset else "flags"
    if preset is None and embedded_default is not None and not _gives(argv, "--model"):
        preset = EMBEDDED_DEFAULTS / f"{embedded_default}.yaml"
        where = f"the embedded default: tiny demo model, {preset}"
    namespace = parser.parse(argv, preset)
    return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if f.init}), where


def parse_config(cls: type[T], argv: Sequence[str] | None = None, *, embedded_default: str | None = None,
                 description: str | None = None, distributed: bool = False) -> T:
    """`read_config` for a recipe: initialize torch.distributed when `distributed` (so only rank 0 logs),
    build the embedded default model if `cfg.model` is it, log the resolved config and return it."""
    cfg, where = read_config(cls, sys.argv[1:] if argv is None else argv, embedded_default=embedded_default,
                             description=description)

    if distributed:
        init_distributed(cpu_threads=getattr(cfg, "cpu_threads", None))
    dist.setup_logging()
    if getattr(cfg, "model", None) == default_model_path():
        default_model()
    dist.get_logger("config").info("%s (%s): %s", cls.__name__, where, json.dumps(dataclasses.asdict(cfg)))
    return cfg
