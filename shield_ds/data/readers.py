"""File readers: the raw rows of CSV, JSONL, Parquet, `save_to_disk` directories and hub datasets, each
with its position for error messages, and the content-addressed cache for image bytes found in them.

CSV, JSON and JSONL are read with the standard library (exact row numbers in errors, no type
guessing: a prompt "NA" or "None" stays a string, ids stay strings, no cache writes from every
rank); Parquet through pyarrow; hub datasets through `datasets.load_dataset`, directories written
by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (a pre-downloaded copy on a cluster without
internet) through `datasets.load_from_disk`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from pathlib import Path
from typing import Any

from shield_ds.errors import ShieldError, first_line
from shield_ds.io import read_jsonl

Row = dict[str, Any]


def image_cache_dir() -> Path:
    """Where image objects from datasets are written: $SHIELD_DS_IMAGE_CACHE, else ~/.cache/shield_ds/images.

    On a multi-node cluster it must be on a filesystem every node sees (as the HF cache usually is).
    """
    env = os.environ.get("SHIELD_DS_IMAGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "shield_ds" / "images"


def read_csv_rows(path: Path) -> list[tuple[str, Row]]:
    """(position, row) per CSV row, strings as written; a ragged row is an error naming it."""
    rows = []
    row_no = 0
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None:
                raise ShieldError(f"{path}: empty CSV file (no header row)")
            for row_no, row in enumerate(reader, start=1):
                if None in row:
                    raise ShieldError(f"{path} row {row_no}: more fields than the header has columns")
                if any(value is None for value in row.values()):
                    raise ShieldError(f"{path} row {row_no}: fewer fields than the header has columns")
                rows.append((f"row {row_no}", row))
    except (csv.Error, UnicodeDecodeError) as exc:
        raise ShieldError(f"{path} row {row_no + 1}: malformed CSV ({first_line(exc)})") from None
    except OSError as exc:
        raise ShieldError(f"{path}: cannot read ({first_line(exc)})") from None
    return rows


def read_jsonl_rows(path: Path) -> list[tuple[str, Row]]:
    """(position, object) per JSONL line."""
    rows = []
    for line_no, row in read_jsonl(path, lambda n: f"{path} line {n}"):
        if not isinstance(row, dict):
            raise ShieldError(f"{path} line {line_no}: expected a JSON object, got {type(row).__name__}")
        rows.append((f"line {line_no}", row))
    return rows


def read_parquet_rows(path: Path) -> list[tuple[str, Row]]:
    """(position, row) per Parquet row."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise ShieldError(f"{path}: unreadable Parquet file ({first_line(exc)})") from None
    return [(f"row {i}", row) for i, row in enumerate(table.to_pylist(), start=1)]


def cache_image(data: bytes, where: str) -> str:
    """Write encoded image bytes to the image cache under their sha256 (idempotent, atomic); the path."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            suffix = (image.format or "png").lower()
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ShieldError(f"{where}: column 'image' holds bytes that are not a readable image ({first_line(exc)})") from None
    cache = image_cache_dir()
    target = cache / f"{hashlib.sha256(data).hexdigest()[:32]}.{suffix}"
    if not target.is_file():
        try:
            cache.mkdir(parents=True, exist_ok=True)
            tmp = cache / f".{target.name}.{os.getpid()}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, target)  # ranks writing the same image race harmlessly: same bytes, same name
        except OSError as exc:
            raise ShieldError(f"image cache {cache}: cannot write ({first_line(exc)}); set SHIELD_DS_IMAGE_CACHE") from None
    return str(target.resolve())


def is_saved_dataset(path: Path) -> bool:
    """A directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def read_saved_dataset_rows(path: Path) -> tuple[list[tuple[str, Row]], str]:
    """(rows, name) of a `save_to_disk` directory (a DatasetDict's "train" split)."""
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as exc:  # corrupt or partial directory
        raise ShieldError(f"{path}: unreadable saved dataset ({first_line(exc)})") from None
    name = str(path)
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise ShieldError(f"{path}: saved DatasetDict has no 'train' split (splits: {', '.join(dataset)}); "
                              f"pass the split's directory, {path}/<split>")
        dataset, name = dataset["train"], str(path / "train")
    return [(f"row {i}", row) for i, row in enumerate(dataset, start=1)], name


def read_hub_rows(spec: str) -> tuple[list[tuple[str, Row]], str]:
    """(rows, name) of a hub dataset "org/name[:split]" (split "train" by default)."""
    name, _, split = spec.partition(":")
    try:
        import datasets

        dataset = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # network, auth, missing split, unknown name: all user-facing
        raise ShieldError(f"cannot load hub dataset {name!r} (split {split or 'train'!r}): {first_line(exc)}") from None
    return [(f"row {i}", row) for i, row in enumerate(dataset, start=1)], f"hub dataset {name}"
