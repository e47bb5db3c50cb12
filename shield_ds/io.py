"""Atomic writes (an output is either complete or absent, never partial or clobbered) and the JSON /
JSONL / mapping-file readers whose errors name the file (and line)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator
from shield_ds.errors import ShieldError, first_line


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON (indented, UTF-8, sorted keys) atomically."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path` as a whole.

    On failure the temporary directory is removed and an existing `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            if not overwrite:
                raise FileExistsError(path)
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn the errors of reading a UTF-8 text file into one-line ShieldErrors naming it."""
    try:
        yield
    except UnicodeDecodeError as exc:
        raise ShieldError(f"{path}: not UTF-8 text ({first_line(exc)})") from None
    except OSError as exc:
        raise ShieldError(f"{path}: cannot read ({exc.strerror or exc})") from None


def read_json(path: str | os.PathLike) -> Any:
    """The parsed value of a UTF-8 JSON file; errors are ShieldErrors naming the file and line."""
    path = Path(path)
    with _reading(path), open(path, encoding="utf-8-sig") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as exc:
            raise ShieldError(f"{path} line {exc.lineno}: malformed JSON ({exc.msg})") from None


def read_jsonl(path: str | os.PathLike, where: Callable[[int], str]) -> list[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of a UTF-8 JSONL file.

    Errors are ShieldErrors; `where(line_no)` names the place (each caller keeps its own style).
    """
    path = Path(path)
    rows = []
    with _reading(path), open(path, encoding="utf-8-sig") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append((line_no, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise ShieldError(f"{where(line_no)}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    return rows


def read_mapping(path: str | os.PathLike, what: str) -> dict:
    """The mapping in a user's JSON (by the .json suffix) or YAML file; an empty YAML file is {}.

    `what` names the file in errors ("refusal phrase file"): a missing file, malformed text or a
    document that is not a mapping is a one-line ShieldError naming the path.
    """
    import yaml


    path = Path(path)
    if not path.is_file():
        raise ShieldError(f"{path}: {what} not found")
    with _reading(path):
        text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ShieldError(f"{path}: malformed {what} ({first_line(exc)})") from None
    if data is None and path.suffix.lower() != ".json":
        return {}
    if not isinstance(data, dict):
        raise ShieldError(f"{path}: a {what} must be a mapping, not {type(data).__name__}")
    return data
