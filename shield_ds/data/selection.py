"""Record selection: filter and limit records, serve them in the requested modalities, and
`load_labeled`, the one path every recipe takes from its data flags to records."""

from __future__ import annotations

import os
import random
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Iterable

from shield_ds.data.layouts import load_source
from shield_ds.data.records import CARRIER_PROMPT, SafetyRecord, check_label, check_language, check_modality
from shield_ds.data.splits import SplitSpec
from shield_ds.errors import ShieldError


def _check_requested(name: str, requested: Iterable[str], present: set[str], check) -> list[str]:
    values = [check(value) for value in requested]
    absent = [value for value in values if value not in present]
    if absent:
        raise ShieldError(f"requested {name} not in the data: {', '.join(absent)} "
                          f"(present: {', '.join(sorted(present)) or 'none'})")
    return values


def select_records(records: list[SafetyRecord], *, languages: Iterable[str] | None = None,
                   modalities: Iterable[str] | None = None, labels: Iterable[str] | None = None,
                   per_group_limit: int | None = None, seed: int = 0) -> list[SafetyRecord]:
    """Filter by language/modality/label, shuffle with `seed`, keep at most `per_group_limit` per group.

    The result is identical on every rank for the same input and seed. Unknown codes and requested
    values absent from the data raise ShieldError naming them.
    """
    keep_lang = set(_check_requested("languages", languages, {r.language for r in records}, check_language)) \
        if languages is not None else None
    keep_mod = set(_check_requested("modalities", modalities, {r.modality for r in records}, check_modality)) \
        if modalities is not None else None
    keep_label = set(_check_requested("labels", labels, {r.label for r in records}, check_label)) \
        if labels is not None else None
    chosen = [r for r in records
              if (keep_lang is None or r.language in keep_lang)
              and (keep_mod is None or r.modality in keep_mod)
              and (keep_label is None or r.label in keep_label)]
    random.Random(seed).shuffle(chosen)
    if per_group_limit is not None:
        if per_group_limit < 1:
            raise ShieldError(f"per_group_limit must be >= 1, got {per_group_limit}")
        taken: dict[str, int] = defaultdict(int)
        limited = []
        for record in chosen:
            if taken[record.group] < per_group_limit:
                taken[record.group] += 1
                limited.append(record)
        chosen = limited
    return chosen


def with_modalities(records: list[SafetyRecord], modalities: Iterable[str], *,
                    image: str | os.PathLike | None = None) -> list[SafetyRecord]:
    """Serve records in the requested modalities ("text", "typographic", "image").

    A text record becomes: itself ("text"); a typographic view ("typographic": its prompt goes into
    the image, the text is CARRIER_PROMPT); an image view with the user-supplied `image` ("image").
    Derived views get the id suffix "@typographic" / "@image". Records that are already image or
    typographic pass through when their modality is requested and are dropped otherwise.
    """
    wanted = [check_modality(m) for m in modalities]
    if not wanted:
        raise ShieldError("with_modalities: no modality requested")
    image_path = None
    if "image" in wanted and any(r.modality == "text" for r in records):
        if image is None:
            raise ShieldError("modality 'image' for text records needs an image file (none given)")
        image_path = Path(image).expanduser()
        if not image_path.is_file():
            raise ShieldError(f"image file not found: {image_path}")
        image_path = str(image_path.resolve())
    views = []
    for record in records:
        if record.modality != "text":
            if record.modality in wanted:
                views.append(record)
            continue
        for modality in wanted:
            if modality == "text":
                views.append(record)
            elif modality == "typographic":
                views.append(replace(record, id=f"{record.id}@typographic", modality="typographic",
                                     prompt=CARRIER_PROMPT, image_text=record.prompt))
            else:
                views.append(replace(record, id=f"{record.id}@image", modality="image", image=image_path))
    return views


def load_labeled(harmful: Iterable[str], benign: Iterable[str], *, modalities: Iterable[str],
                 languages: Iterable[str] | None = None, image: str | os.PathLike | None = None,
                 per_group_limit: int | None = None, benign_per_group_limit: int | None = None, seed: int = 0,
                 data_dir: str | os.PathLike | None = None, require: Iterable[str] = ("harmful",),
                 split: SplitSpec = SplitSpec()) -> list[SafetyRecord]:
    """Harmful and benign records from their sources, in `split`, served in `modalities` and filtered.

    The one path every recipe takes from `--harmful/--benign/--languages/--modalities/--split/...` to
    records. The split (by prompt key, `shield_ds.data.splits`) is taken from each source before the
    per-group limit, so the limit counts inside the split. `benign_per_group_limit` replaces the limit
    for benign records (each label is shuffled on its own, so the harmful records stay the same and a
    larger benign limit keeps the smaller one's records and adds others). A source without a prompt of
    a requested language in the split is a ShieldError naming both. A label listed in `require` that ends up with
    no record is a ShieldError naming its sources.
    """
    modalities = list(modalities)
    languages = list(languages) if languages is not None else None
    records: list[SafetyRecord] = []
    for flag, limit in (("--per-group-limit", per_group_limit), ("--benign-per-group-limit", benign_per_group_limit)):
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ShieldError(f"{flag} must be a positive integer, got {limit!r}")
    limits = {"harmful": per_group_limit,
              "benign": benign_per_group_limit if benign_per_group_limit is not None else per_group_limit}
    for specs, label in ((list(harmful), "harmful"), (list(benign), "benign")):
        recs = [r for spec in specs
                for r in split.apply(load_source(spec, label=label, data_dir=data_dir), languages=languages,
                                     source=spec)]
        if recs:
            recs = select_records(with_modalities(recs, modalities, image=image), languages=languages,
                                  modalities=modalities, per_group_limit=limits[label], seed=seed)
        if not recs and label in require:
            raise ShieldError(f"empty {label} set: no records from {', '.join(specs) or 'no source'} for "
                              f"languages {', '.join(languages) if languages else 'all'} and modalities "
                              f"{', '.join(modalities)}")
        records += recs
    return records
