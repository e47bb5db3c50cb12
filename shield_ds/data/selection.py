"""Record selection: filter and limit records, serve them in the requested modalities, and
`load_labeled`, the one path every recipe takes from its data flags to records."""

from __future__ import annotations

import math
import os
import random
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Sequence

from shield_ds.data.layouts import EVAL_ONLY_SOURCES, load_source
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


def parse_mix(mix: Iterable[str], sources: Sequence[str]) -> list[float]:
    """`--benign-mix` entries SOURCE=WEIGHT -> one weight per source of `sources` (equal when `mix` is empty).
    A weight that is not a positive number, a source not among `sources`, or a source left out: ShieldError."""
    entries = list(mix)
    if not entries:
        return [1.0] * len(sources)
    weights: dict[str, float] = {}
    for entry in entries:
        name, sep, value = str(entry).partition("=")
        name = name.strip()
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not sep or not name or not math.isfinite(weight) or weight <= 0:
            raise ShieldError(f"--benign-mix {entry!r}: expected SOURCE=WEIGHT with a positive number as the weight")
        if name not in sources:
            raise ShieldError(f"--benign-mix {entry!r}: {name!r} is not a --benign source ({', '.join(sources)})")
        weights[name] = weight
    missing = [source for source in sources if source not in weights]
    if missing:
        raise ShieldError(f"--benign-mix: no weight for the --benign source {missing[0]!r}")
    return [weights[source] for source in sources]


def mix_quotas(limit: int, weights: Sequence[float]) -> list[int]:
    """Split a per-group limit among sources in proportion to `weights` (largest remainders, ties to the first)."""
    total = sum(weights)
    exact = [limit * w / total for w in weights]
    quotas = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (quotas[i] - exact[i], i))
    for i in order[: limit - sum(quotas)]:
        quotas[i] += 1
    return quotas


def load_labeled(harmful: Iterable[str], benign: Iterable[str], *, modalities: Iterable[str],
                 languages: Iterable[str] | None = None, image: str | os.PathLike | None = None,
                 per_group_limit: int | None = None, benign_per_group_limit: int | None = None, seed: int = 0,
                 data_dir: str | os.PathLike | None = None, require: Iterable[str] = ("harmful",),
                 split: SplitSpec = SplitSpec(), benign_mix: Iterable[str] = (),
                 evaluation: bool = False) -> list[SafetyRecord]:
    """Harmful and benign records from their sources, in `split`, served in `modalities` and filtered.

    The one path every recipe takes from `--harmful/--benign/--languages/--modalities/--split/...` to
    records. The split (by prompt key, `shield_ds.data.splits`) is taken from each source before the
    per-group limit, so the limit counts inside the split. `benign_per_group_limit` replaces the limit
    for benign records (each label is shuffled on its own, so the harmful records stay the same and a
    larger benign limit keeps the smaller one's records and adds others). A source without a prompt of
    a requested language in the split is a ShieldError naming both. A label listed in `require` that ends up with
    no record is a ShieldError naming its sources. Several benign sources share the benign limit by
    `benign_mix` (SOURCE=WEIGHT, default equal shares, `mix_quotas`), each source selected on its own, so the
    harmful and benign sides keep the mix of forms asked for whatever the sources' sizes; without a limit every
    benign record of every source is kept. An evaluation-only harmful source (`EVAL_ONLY_SOURCES`) is refused
    unless `evaluation`, and is selected on its own with the whole harmful limit (it is a slice of its own).
    """
    modalities = list(modalities)
    languages = list(languages) if languages is not None else None
    records: list[SafetyRecord] = []
    for flag, limit in (("--per-group-limit", per_group_limit), ("--benign-per-group-limit", benign_per_group_limit)):
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ShieldError(f"{flag} must be a positive integer, got {limit!r}")
    limits = {"harmful": per_group_limit,
              "benign": benign_per_group_limit if benign_per_group_limit is not None else per_group_limit}
    benign, benign_mix, harmful = list(benign), list(benign_mix), list(harmful)
    eval_only = {spec for spec in harmful + benign if spec.strip().lower() in EVAL_ONLY_SOURCES}
    for spec in eval_only:
        if not evaluation:
            raise ShieldError(f"{spec}: an evaluation-only source (never identified or trained on); use it with "
                              "evaluate.py only")
    weights = parse_mix(benign_mix, benign)
    if benign_mix and limits["benign"] is None:
        raise ShieldError("--benign-mix needs a benign limit (--benign-per-group-limit or --per-group-limit) to "
                          "share among the sources")
    for specs, label in ((harmful, "harmful"), (benign, "benign")):
        loaded = [split.apply(load_source(spec, label=label, data_dir=data_dir), languages=languages, source=spec)
                  for spec in specs]
        if label == "benign" and len(specs) > 1 and limits[label] is not None:
            # one selection per source, each with its share of the limit
            parts = [(recs, quota, languages) for recs, quota in zip(loaded, mix_quotas(limits[label], weights))]
        else:
            own = [spec in eval_only for spec in specs]
            parts = [([r for recs, alone in zip(loaded, own) if not alone for r in recs], limits[label], languages)]
            # an evaluation-only source covers only some languages (SafeBench: English): the others are not missing
            parts += [([r for r in recs if languages is None or r.language in languages], limits[label], None)
                      for recs, alone in zip(loaded, own) if alone]
        recs = []
        for part, limit, part_languages in parts:
            if part and (limit is None or limit > 0):
                recs += select_records(with_modalities(part, modalities, image=image), languages=part_languages,
                                       modalities=modalities, per_group_limit=limit, seed=seed)
        if not recs and label in require:
            raise ShieldError(f"empty {label} set: no records from {', '.join(specs) or 'no source'} for "
                              f"languages {', '.join(languages) if languages else 'all'} and modalities "
                              f"{', '.join(modalities)}")
        records += recs
    return records
