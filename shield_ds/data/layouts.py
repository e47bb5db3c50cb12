"""Dataset layouts: files, built-in data and hub datasets -> `SafetyRecord`s (`load_source`).

Layouts understood (detected from the columns):
  MultiJail     wide CSV `id, source, tags, en, zh, ...`: one record per language column (harmful)
  requests      wide CSV `id, form, topic, en, zh, ...`: the project's benign requests and borderline
                prompts (`shield_ds/data/builtin/`), one record per language column, `form` per row
  MultiQ        `id, language, prompt, domain`: benign questions, parallel by id
  FigStep       SafeBench `category_id, task_id, category_name, question, instruction`: the instruction
                is rendered into a typographic image, the text is a neutral carrier prompt (harmful);
                built-in `safebench-text` reads the same rows as English text records of the `question`
  MM-SafetyBench `processed_questions/<scenario>.json` ({"0": {"Rephrased Question": ...}, ...}) with
                images in `imgs/<scenario>/<SD|SD_TYPO|TYPO>/<id>.jpg` (harmful)
  VLGuard       `train.json`/`test.json` ([{"id", "image", "safe", "instr-resp": [...]}]) with images
                under `<train|test>/` beside the JSON (safe_instruction -> benign, others -> harmful)
  generic       columns prompt, language, label [, modality, image, image_text, response, category,
                id, source, form]; `image` is a path relative to the file, or (hub datasets, `save_to_disk`
                directories, Parquet) an image object / {"bytes", "path"} struct, which is written
                once to the content-addressed image cache (`readers.image_cache_dir()`)
Raw rows come from `shield_ds.data.readers`.
"""

from __future__ import annotations

import ast
import io
import os
from pathlib import Path
from typing import Any

from shield_ds.data.readers import (Row, cache_image, is_saved_dataset, read_csv_rows, read_hub_rows, read_jsonl_rows,
                                    read_parquet_rows, read_saved_dataset_rows)
from shield_ds.data.records import (CARRIER_PROMPT, KNOWN_LANGUAGES, SafetyRecord, check_label,
                                   check_modality)
from shield_ds.data.splits import derive_prompt_key, make_prompt_key
from shield_ds.dist import get_logger
from shield_ds.errors import ShieldError
from shield_ds.io import read_json

log = get_logger("data")

BUILTIN = {
    "multijail": "multijail.csv",
    "multiq": "multiq_benign.csv",
    "figstep": "figstep_safebench.csv",
    "safebench": "figstep_safebench.csv",
    "safebench-text": "figstep_safebench.csv",  # the questions as English text: an evaluation-only harmful slice
}
# Harmful sources that only evaluations may read (never identified on or trained on): each is its own slice of
# the results and is selected on its own, not pooled with the other harmful sources under one limit.
EVAL_ONLY_SOURCES = ("safebench-text",)
# Built-in sources shipped inside the package (not in the shared data directory).
PACKAGE_DATA_DIR = Path(__file__).resolve().parent / "builtin"
PACKAGED = {"requests": "requests.csv"}
FILE_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")
MM_SAFETY_VARIANTS = {"SD": "Rephrased Question(SD)", "SD_TYPO": "Rephrased Question", "TYPO": "Rephrased Question"}


def default_data_dir() -> Path:
    """The shared data directory: $SHIELD_DS_DATA, else <repo>/../shared/data."""
    env = os.environ.get("SHIELD_DS_DATA")
    if env:
        return Path(env).expanduser().resolve()
    repo = Path(__file__).resolve().parents[2]
    return (repo.parent / "shared" / "data").resolve()


def _text(row: Row, key: str) -> str | None:
    """An optional string field: missing, None and blank all read as None."""
    value = row.get(key)
    if value is None:
        return None
    value = str(value)
    return value if value.strip() else None


def _require(row: Row, key: str, where: str) -> str:
    if key not in row:
        columns = ", ".join(sorted(map(str, row)))
        raise ShieldError(f"{where}: missing column {key!r} (columns: {columns})")
    value = _text(row, key)
    if value is None:
        raise ShieldError(f"{where}: empty {key!r}")
    return value


def _record(where: str, **fields) -> SafetyRecord:
    """Build a record; a validation error gets the file and row in front."""
    try:
        return SafetyRecord(**fields)
    except ShieldError as exc:
        raise ShieldError(f"{where}: {exc}") from None


def _multijail(rows, name: str, label: str | None) -> list[SafetyRecord]:
    records = []
    for where, row in rows:
        where = f"{name} {where}"
        row_id = _require(row, "id", where)
        tags = _text(row, "tags")
        category = None
        if tags:
            try:
                parsed = ast.literal_eval(tags)
                category = "; ".join(map(str, parsed)) if isinstance(parsed, (list, tuple)) else str(parsed)
            except (ValueError, SyntaxError):
                category = tags
        for lang in _wide_language_columns(row):
            records.append(_record(
                f"{where} column {lang!r}", id=f"multijail-{row_id}.{lang}", prompt=_require(row, lang, where),
                language=lang, label=label or "harmful", source="multijail", category=category,
                prompt_key=make_prompt_key("multijail", row_id)))
    return records


def _requests(rows, name: str, label: str | None) -> list[SafetyRecord]:
    stem = Path(name).stem
    records = []
    for where, row in rows:
        where = f"{name} {where}"
        row_id = _require(row, "id", where)
        form = _require(row, "form", where)
        for lang in _wide_language_columns(row):
            records.append(_record(
                f"{where} column {lang!r}", id=f"{stem}-{row_id}.{lang}", prompt=_require(row, lang, where),
                language=lang, label=label or "benign", source=stem, category=_text(row, "topic"), form=form,
                prompt_key=make_prompt_key(stem, row_id)))
    return records


def _wide_language_columns(row: Row) -> list[str]:
    # "id" is also the ISO code of Indonesian; here it is always the row id.
    return [key for key in row if key in KNOWN_LANGUAGES and key != "id"]


def _multiq(rows, name: str, label: str | None) -> list[SafetyRecord]:
    records = []
    for where, row in rows:
        where = f"{name} {where}"
        lang = _require(row, "language", where)
        row_id = _require(row, "id", where)
        records.append(_record(
            where, id=f"multiq-{row_id}.{str(lang).strip().lower()}",
            prompt=_require(row, "prompt", where), language=lang, label=label or "benign",
            source="multiq", category=_text(row, "domain"), prompt_key=make_prompt_key("multiq", row_id)))
    return records


def _figstep(rows, name: str, label: str | None, view: str = "typographic") -> list[SafetyRecord]:
    """FigStep rows as typographic records (the instruction in the image), or with `view` "text" as English text
    records of the question (`safebench-text`; the same prompt keys, so both views split alike)."""
    records = []
    for where, row in rows:
        where = f"{name} {where}"
        dataset = _text(row, "dataset") or "safebench"
        task = f"{_require(row, 'category_id', where)}-{_require(row, 'task_id', where)}"
        if view == "text":
            records.append(_record(
                where, id=f"safebench-{task}", prompt=_require(row, "question", where), language="en",
                label=label or "harmful", source="safebench-text", category=_text(row, "category_name"),
                prompt_key=make_prompt_key("figstep", task)))
            continue
        records.append(_record(
            where, id=f"figstep-{task}", prompt=CARRIER_PROMPT, language="en", label=label or "harmful",
            modality="typographic", image_text=_require(row, "instruction", where), source=f"figstep/{dataset}",
            category=_text(row, "category_name"), prompt_key=make_prompt_key("figstep", task)))
    return records


def _image(row: Row, base: Path | None, where: str) -> str | None:
    """The `image` field as a readable file path: a path string, or an image object / struct cached to disk."""
    value = row.get("image")
    if value is None:
        return None
    if isinstance(value, dict):  # datasets' Image feature undecoded / Parquet struct: {"bytes", "path"}
        if value.get("bytes"):
            return cache_image(bytes(value["bytes"]), where)
        value = value.get("path")
        if value is None:
            return None
    if isinstance(value, (bytes, bytearray)):
        return cache_image(bytes(value), where) if value else None
    if hasattr(value, "save") and hasattr(value, "mode"):  # a PIL image (datasets' decoded Image feature)
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return cache_image(buffer.getvalue(), where)
    if not isinstance(value, str):
        raise ShieldError(f"{where}: column 'image' holds a {type(value).__name__}, expected a path or an image")
    if not value.strip():
        return None
    if base is None:
        raise ShieldError(f"{where}: image paths are only supported in local files and dataset directories")
    return _resolve_image(value, base, where)


def _resolve_image(value: str, base: Path, where: str) -> str:
    image = Path(value).expanduser()
    if not image.is_absolute():
        image = base / image
    if not image.is_file():
        raise ShieldError(f"{where}: image file not found: {image}")
    return str(image.resolve())


def _generic(rows, name: str, base: Path | None, label: str | None) -> list[SafetyRecord]:
    records = []
    seen: dict[str, str] = {}
    stem = Path(name).stem if base is not None else name.replace("/", "-")
    for index, (where, row) in enumerate(rows, start=1):
        where = f"{name} {where}"
        language = _require(row, "language", where)
        row_label = label or _require(row, "label", where)
        image_text = _text(row, "image_text")
        image = _image(row, base, where)
        modality = _text(row, "modality") or ("image" if image else "typographic" if image_text else "text")
        try:
            modality = check_modality(modality)
        except ShieldError as exc:
            raise ShieldError(f"{where}: {exc}") from None
        if "prompt" not in row:
            _require(row, "prompt", where)
        prompt = _text(row, "prompt")
        if prompt is None and modality == "typographic":
            prompt = CARRIER_PROMPT
        if prompt is None:
            raise ShieldError(f"{where}: empty 'prompt'")
        given_id = _text(row, "id")
        record_id = given_id or f"{stem}-{index}"
        if record_id in seen:
            raise ShieldError(f"{where}: duplicate id {record_id!r} (first at {seen[record_id]})")
        seen[record_id] = where
        # by the id column (without a ".<language>" suffix: "7.en" and "7.zh" are one prompt), else by row
        key = derive_prompt_key(given_id, str(language).strip().lower()) if given_id else f"row{index}"
        records.append(_record(
            where, id=record_id, prompt=prompt, language=language, label=row_label, modality=modality,
            image=image, image_text=image_text, response=_text(row, "response"),
            source=_text(row, "source") or stem, category=_text(row, "category"), form=_text(row, "form"),
            prompt_key=make_prompt_key(stem, key)))
    return records


def _vlguard(items: list, path: Path, label: str | None) -> list[SafetyRecord]:
    # Images are published as train.zip / test.zip; unpacked they sit in train/ or test/ beside the JSON.
    roots = [path.parent / path.stem, path.parent]
    records = []
    for index, item in enumerate(items, start=1):
        where = f"{path} item {index}"
        if not isinstance(item, dict):
            raise ShieldError(f"{where}: expected a JSON object")
        item_id = _require(item, "id", where)
        image_rel = _require(item, "image", where)
        image = next((root / image_rel for root in roots if (root / image_rel).is_file()), None)
        if image is None:
            raise ShieldError(f"{where}: image file not found: {image_rel} (looked in {roots[0]} and {roots[1]})")
        pairs = item.get("instr-resp")
        if not isinstance(pairs, list) or not pairs:
            raise ShieldError(f"{where}: missing column 'instr-resp'")
        for pair in pairs:
            if not isinstance(pair, dict):
                raise ShieldError(f"{where}: 'instr-resp' entries must be objects")
            if "safe_instruction" in pair:
                kind, default_label = "safe", "benign"
            elif "unsafe_instruction" in pair:
                kind, default_label = "unsafe", "harmful"
            elif "instruction" in pair:
                kind, default_label = "harmful", "harmful"
            else:
                raise ShieldError(f"{where}: 'instr-resp' entry without an instruction")
            key = "instruction" if kind == "harmful" else f"{kind}_instruction"
            category = item.get("harmful_subcategory") or item.get("harmful_category")
            records.append(_record(
                where, id=f"vlguard-{item_id}.{kind}", prompt=_require(pair, key, where), language="en",
                label=label or default_label, modality="image", image=str(image.resolve()),
                response=_text(pair, "response"), source=f"vlguard/{path.stem}",
                category=str(category) if category else None,
                prompt_key=make_prompt_key("vlguard", item_id)))  # one image: its safe and unsafe requests together
    return records


def _mm_safety(questions: dict, path: Path, label: str | None, variant: str) -> list[SafetyRecord]:
    if variant not in MM_SAFETY_VARIANTS:
        raise ShieldError(f"unknown MM-SafetyBench variant {variant!r} (expected one of {', '.join(MM_SAFETY_VARIANTS)})")
    scenario = path.stem  # e.g. "01-Illegal_Activitiy" (sic, as published)
    candidates = [path.parent.parent / "imgs", path.parent / "imgs", path.parent.parent]
    root = next((c for c in candidates if (c / scenario).is_dir()), candidates[0])
    category = scenario.split("-", 1)[-1]
    records = []
    for qid, item in questions.items():
        where = f"{path} question {qid!r}"
        if not isinstance(item, dict):
            raise ShieldError(f"{where}: expected a JSON object")
        image = root / scenario / variant / f"{qid}.jpg"
        if not image.is_file():
            raise ShieldError(f"{where}: image file not found: {image}")
        records.append(_record(
            where, id=f"mmsafety-{scenario}-{qid}.{variant}", prompt=_require(item, MM_SAFETY_VARIANTS[variant], where),
            language="en", label=label or "harmful", modality="image", image=str(image.resolve()),
            source=f"mm-safetybench/{variant}", category=category,
            prompt_key=make_prompt_key("mmsafety", f"{scenario}-{qid}")))  # SD, SD_TYPO and TYPO views: one prompt
    return records


def _is_mm_safety(data: Any) -> bool:
    return (isinstance(data, dict) and bool(data)
            and all(isinstance(v, dict) and "Rephrased Question" in v for v in data.values()))


def _records_from_rows(rows: list[tuple[str, Row]], name: str, base: Path | None,
                       label: str | None) -> list[SafetyRecord]:
    """Detect the layout from the first row's columns and convert every row."""
    if not rows:
        raise ShieldError(f"{name}: no rows")
    columns = set(rows[0][1])
    if {"instruction", "category_id", "task_id"} <= columns:
        return _figstep(rows, name, label)
    if "prompt" not in columns and "en" in columns and len(_wide_language_columns(rows[0][1])) >= 2:
        return _requests(rows, name, label) if "form" in columns else _multijail(rows, name, label)
    if {"id", "language", "prompt", "domain"} <= columns and "label" not in columns:
        return _multiq(rows, name, label)
    return _generic(rows, name, base, label)


def _load_file(path: Path, label: str | None, mmsafety_variant: str) -> list[SafetyRecord]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _records_from_rows(read_csv_rows(path), str(path), path.parent, label)
    if suffix == ".jsonl":
        return _records_from_rows(read_jsonl_rows(path), str(path), path.parent, label)
    if suffix == ".parquet":
        return _records_from_rows(read_parquet_rows(path), str(path), path.parent, label)
    if suffix == ".json":
        data = read_json(path)
        if _is_mm_safety(data):
            return _mm_safety(data, path, label, mmsafety_variant)
        if isinstance(data, list) and data and isinstance(data[0], dict) and "instr-resp" in data[0]:
            return _vlguard(data, path, label)
        if isinstance(data, list):
            for index, item in enumerate(data, start=1):
                if not isinstance(item, dict):
                    raise ShieldError(f"{path} item {index}: expected a JSON object, got {type(item).__name__}")
            return _records_from_rows([(f"item {i}", row) for i, row in enumerate(data, start=1)],
                                      str(path), path.parent, label)
        raise ShieldError(f"{path}: unrecognised JSON layout (expected a list of records, "
                          "MM-SafetyBench questions or VLGuard metadata)")
    raise ShieldError(f"{path}: unsupported file type {suffix!r} (expected one of {', '.join(FILE_SUFFIXES)})")


def _load_dir(path: Path, label: str | None, mmsafety_variant: str) -> list[SafetyRecord]:
    """A `save_to_disk` dataset, an MM-SafetyBench data directory (with processed_questions/) or a
    folder of its question files."""
    if is_saved_dataset(path):
        rows, name = read_saved_dataset_rows(path)
        return _records_from_rows(rows, name, path, label)
    folder = path / "processed_questions" if (path / "processed_questions").is_dir() else path
    files = sorted(folder.glob("*.json"))
    if not files:
        raise ShieldError(f"{path}: neither a saved dataset (save_to_disk) nor a directory of MM-SafetyBench "
                          "question files (*.json)")
    records = []
    for file in files:
        records.extend(_load_file(file, label, mmsafety_variant))
    return records


def load_source(spec: str, *, label: str | None = None, data_dir: str | os.PathLike | None = None,
                mmsafety_variant: str = "SD_TYPO") -> list[SafetyRecord]:
    """Load records from a built-in name, a file or directory, or a hub dataset ("org/name[:split]").

    Built-in: "multijail" (harmful, 10 languages), "multiq" (benign questions), "figstep"/"safebench"
    (harmful, typographic), "safebench-text" (the same, as English text), read from `data_dir` (default
    `default_data_dir()`); "requests" (benign requests and borderline prompts, 10 languages) ships in the package.
    `label`, when given, is the label of every record (overriding the file's and the layout's).
    `mmsafety_variant` picks the MM-SafetyBench images: SD, SD_TYPO (default) or TYPO.
    """
    if label is not None:
        label = check_label(label)
    key = spec.strip().lower()
    if key in PACKAGED:
        records = _load_file(PACKAGE_DATA_DIR / PACKAGED[key], label, mmsafety_variant)
    elif key in BUILTIN:
        path = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        path = path / BUILTIN[key]
        if not path.is_file():
            raise ShieldError(f"built-in dataset {key!r}: file not found: {path} (set SHIELD_DS_DATA)")
        if key == "safebench-text":
            records = _figstep(read_csv_rows(path), str(path), label, view="text")
        else:
            records = _load_file(path, label, mmsafety_variant)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            records = _load_dir(path, label, mmsafety_variant)
        elif path.is_file():
            records = _load_file(path, label, mmsafety_variant)
        elif path.suffix.lower() in FILE_SUFFIXES or spec.startswith((".", "/", "~")):
            raise ShieldError(f"data file not found: {path}")
        else:
            rows, name = read_hub_rows(spec.strip())
            records = _records_from_rows(rows, name, None, label)
    log.info("loaded %d records from %s", len(records), spec)
    return records
