"""Recipe arguments: argparse flags, optionally preset from a YAML file (`--config FILE`).

Precedence: built-in defaults < YAML file < command-line flags (torchtune style).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

import yaml

from shield_ds.errors import ShieldError


EMBEDDED_DEFAULTS = Path(__file__).resolve().parents[1] / "configs" / "default"


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
               embedded_default: str | None = None) -> argparse.Namespace:
    """Parse `argv`, taking defaults from the YAML file named by `--config` (keys are flag names).

    With neither `--model` nor `--config`, the recipe runs on the embedded default: the tiny demo
    model with `configs/default/<embedded_default>.yaml`.
    """
    parser.add_argument("--config", type=Path, default=None, help="YAML file whose keys preset the flags")
    pre, _ = parser.parse_known_args(argv)
    config = pre.config
    if config is None and embedded_default and getattr(pre, "model", None) is None:
        config = EMBEDDED_DEFAULTS / f"{embedded_default}.yaml"
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"no --model or --config: the embedded default (tiny llava, {config})", flush=True)
    if config is not None:
        parser.set_defaults(**load_yaml_defaults(parser, config))
    return parser.parse_args(argv)


def load_yaml_defaults(parser: argparse.ArgumentParser, path: Path) -> dict:
    if not path.is_file():
        raise ShieldError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ShieldError(f"{path}: malformed YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ShieldError(f"{path}: a config file must be a mapping of flag names to values")
    known = {action.dest for action in parser._actions}
    defaults = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in known:
            raise ShieldError(f"{path}: unknown key {key!r}")
        defaults[dest] = value
    return defaults


def csv_list(text: str | Sequence[str] | None) -> list[str] | None:
    """'en,zh' or ['en','zh'] -> ['en','zh']; None/'' -> None."""
    if text is None:
        return None
    items = text.split(",") if isinstance(text, str) else [str(t) for t in text]
    items = [t.strip() for t in items if t.strip()]
    return items or None


def csv_ints(text: str | Sequence[int] | None, flag: str) -> list[int]:
    """'10,20' or [10, 20] -> [10, 20]; None/'' -> []; anything else names `flag`."""
    if text is None or isinstance(text, int):
        return [] if text is None else [text]
    items = csv_list(text if isinstance(text, str) else [str(t) for t in text]) or []
    try:
        return [int(t) for t in items]
    except ValueError:
        raise ShieldError(f"{flag} {','.join(items)!r}: expected comma-separated integers") from None


class SourcesAction(argparse.Action):
    """`--harmful A B --harmful C` -> [A, B, C]; the first use replaces a default (e.g. from --config)."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = f"_{self.dest}_given"
        current = list(getattr(namespace, self.dest) or []) if getattr(namespace, seen, False) else []
        setattr(namespace, seen, True)
        setattr(namespace, self.dest, current + list(values))


def add_data_args(parser: argparse.ArgumentParser, *, modalities: str, split: str = "all") -> None:
    """The data flags every recipe shares (see `data_kwargs`); `split` is the recipe's default split."""
    parser.add_argument("--harmful", action=SourcesAction, nargs="+", default=None, metavar="SOURCE",
                        help="harmful prompts: files, hub datasets or builtin names (default multijail)")
    parser.add_argument("--benign", action=SourcesAction, nargs="+", default=None, metavar="SOURCE",
                        help="benign prompts (default multiq)")
    parser.add_argument("--languages", default=None, help="comma-separated ISO 639-1 codes (default: all in the data)")
    parser.add_argument("--modalities", default=modalities, help="comma-separated: text, image, typographic")
    parser.add_argument("--image", default=None, help="image file for the 'image' modality view")
    parser.add_argument("--per-group-limit", type=int, default=None, help="at most N records per label x language x modality")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=("train", "test", "all"), default=split,
                        help=f"which prompts: the train or test split by prompt id (the same in every language "
                             f"and view), or all (default {split})")
    parser.add_argument("--test-fraction", type=float, default=0.3, help="share of prompts in the test split")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the train/test split")
    parser.add_argument("--data-dir", default=None, help="where the builtin datasets live (default: ../shared/data)")


def data_kwargs(args: argparse.Namespace) -> dict:
    """The parsed data flags as keyword arguments of the recipe configs."""
    return {"harmful": args.harmful or ["multijail"], "benign": args.benign or ["multiq"],
            "languages": csv_list(args.languages), "modalities": csv_list(args.modalities) or ["text"],
            "image": args.image, "per_group_limit": args.per_group_limit, "seed": args.seed,
            "data_dir": args.data_dir, "split": args.split, "test_fraction": args.test_fraction,
            "split_seed": args.split_seed}


def add_engine_args(parser: argparse.ArgumentParser, *, ds_config: str, allow_none: bool,
                    inference: bool = False) -> None:
    """--ds-config, --ds KEY=VALUE overrides, the deepspeed launcher's --local_rank, and for
    inference recipes (`inference`) --zero auto|on|off (see `shield_ds.engine.choose_zero`)."""
    extra = ", or 'none' for plain PyTorch (a replica per rank, as --zero off)" if allow_none else ""
    parser.add_argument("--ds-config", default=ds_config, help=f"DeepSpeed JSON (default {ds_config}){extra}")
    parser.add_argument("--ds", action="append", default=[], metavar="KEY=VALUE",
                        help="override a ds_config entry, e.g. --ds zero_optimization.offload_param.device=cpu")
    if inference:
        parser.add_argument("--zero", choices=("auto", "on", "off"), default="auto",
                            help="on: ZeRO-3 partitioned model (the ds_config's engine); off: a plain replica of the "
                                 "model on every rank, prompts sharded, results gathered; auto (default): off when "
                                 "the model fits in one device's memory, else on")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


def ds_config_arg(value: str | None) -> str | None:
    return None if value is None or str(value).lower() == "none" else str(value)
