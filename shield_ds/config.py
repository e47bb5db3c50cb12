"""Recipe arguments: argparse flags, optionally preset from a YAML file (`--config FILE`).

Precedence: built-in defaults < YAML file < command-line flags (torchtune style).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import yaml

from shield_ds.errors import ShieldError


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse `argv`, taking defaults from the YAML file named by `--config` (keys are flag names)."""
    parser.add_argument("--config", type=Path, default=None, help="YAML file whose keys preset the flags")
    pre, _ = parser.parse_known_args(argv)
    if pre.config is not None:
        parser.set_defaults(**load_yaml_defaults(parser, pre.config))
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
