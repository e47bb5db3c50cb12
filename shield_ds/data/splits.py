"""Prompt-level train/test splits, their provenance, and the trained-prompt overlap of evaluations.

A record's *prompt key* names the prompt it is a version of: its source and prompt id, without the
language or the modality view (MultiJail row 12 in all ten languages, as text or typographic image,
is `multijail:12`). The readers set `SafetyRecord.prompt_key`; records built without one get the
key `derive_prompt_key` reads off their id. A `SplitSpec` puts a key in the test split when a hash of
(split seed, key) mapped to [0, 1) is below the test fraction, in the validation split when it is
below test fraction + validation fraction (default 0: no validation split), and in the train split
otherwise: the split depends on nothing else, so it stays the same when languages, modalities,
per-group limits or the other records change, and every language and view of one prompt lands on
the same side. A validation split is carved out of the train split only: the test split is the same
with or without it, so settings chosen on validation prompts are reported on the same test prompts.

A trained model carries the keys it was trained on in `shield_provenance.json` (`write_provenance`,
`read_provenance`); evaluations record how many of their keys the evaluated model was trained on
(`trained_overlap` in asr.json) and the tables that present them refuse an overlap unless allowed
(`overlap_note`).
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from shield_ds.errors import ShieldError
from shield_ds.io import read_json, write_json

if TYPE_CHECKING:
    from shield_ds.data.records import SafetyRecord

SPLITS = ("train", "validation", "test", "all")
PROVENANCE_FILE = "shield_provenance.json"
PROVENANCE_FORMAT = "shield_ds.provenance"
OVERLAP_NOTE = "(evaluation prompts overlap the trained prompts)"


def make_prompt_key(source: str, prompt_id: str) -> str:
    """`source:prompt_id`, e.g. `multijail:12`."""
    return f"{source}:{prompt_id}"


def derive_prompt_key(record_id: str, language: str, source: str = "") -> str:
    """The key of a record built without one: its id without a view suffix (`@typographic`) and a
    trailing `.<language>`, after its source."""
    base = str(record_id).split("@", 1)[0]
    suffix = f".{language}"
    if base.endswith(suffix) and len(base) > len(suffix):
        base = base[: -len(suffix)]
    return make_prompt_key(source, base) if source else base


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def split_of(key: str, test_fraction: float, split_seed: int = 0, validation_fraction: float = 0.0) -> str:
    """"test", "validation" or "train" for a prompt key: sha256(seed, key) as a number u in [0, 1);
    test when u < test_fraction, validation when u < test_fraction + validation_fraction."""
    digest = hashlib.sha256(f"{int(split_seed)}\0{key}".encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0 ** 64
    if u < test_fraction:
        return "test"
    return "validation" if u < test_fraction + validation_fraction else "train"


@dataclass(frozen=True)
class SplitSpec:
    """Which prompts a run reads: `split` of the prompt keys hashed with `seed` into test, validation and
    train shares (`split_of`). Checked when built: a known split name, a test fraction in (0, 1) and a
    validation fraction in [0, 1) that leave a train split; split "validation" needs a validation
    fraction (ShieldError otherwise)."""

    split: str = "all"
    test_fraction: float = 0.3
    validation_fraction: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ShieldError(f"unknown split {self.split!r} (expected one of {', '.join(SPLITS)})")
        if not _is_number(self.test_fraction) or not 0 < self.test_fraction < 1:
            raise ShieldError(f"--test-fraction must be in (0, 1), got {self.test_fraction!r}")
        if not _is_number(self.validation_fraction) or not 0 <= self.validation_fraction < 1:
            raise ShieldError(f"--validation-fraction must be in [0, 1), got {self.validation_fraction!r}")
        if self.test_fraction + self.validation_fraction >= 1:
            raise ShieldError(f"--test-fraction {self.test_fraction} + --validation-fraction "
                              f"{self.validation_fraction} leave no train split (their sum must be below 1)")
        if self.split == "validation" and not self.validation_fraction:
            raise ShieldError("--split validation needs --validation-fraction > 0 (the same value training used)")

    @classmethod
    def from_fields(cls, data: Mapping[str, Any]) -> "SplitSpec":
        """The spec an output recorded with `fields` (a validation fraction missing in older outputs is 0)."""
        return cls(split=data["split"], test_fraction=data["test_fraction"],
                   validation_fraction=data.get("validation_fraction", 0.0), seed=data["split_seed"])

    def fields(self) -> dict[str, Any]:
        """The spec as output JSONs record it (`split`, `test_fraction`, `validation_fraction`, `split_seed`)."""
        return {"split": self.split, "test_fraction": self.test_fraction,
                "validation_fraction": self.validation_fraction, "split_seed": self.seed}

    def flags(self) -> str:
        """The command-line flags that chose these shares, for messages."""
        validation = f", --validation-fraction {self.validation_fraction}" if self.validation_fraction else ""
        return f"--test-fraction {self.test_fraction}{validation}, --split-seed {self.seed}"

    def contains(self, record: "SafetyRecord") -> bool:
        return self.split == "all" or split_of(record.prompt_key, self.test_fraction, self.seed,
                                               self.validation_fraction) == self.split

    def apply(self, records: list["SafetyRecord"], *, languages: Iterable[str] | None = None,
              source: str = "") -> list["SafetyRecord"]:
        """The records in this split (all of them for "all"), in their order.

        With split "train", "validation" or "test", every language of `languages` (all languages of the records
        when None) that the records have must keep at least one prompt: a source too small for the split is a
        ShieldError naming `source` and the language.
        """
        if self.split == "all":
            return list(records)
        kept = [r for r in records if self.contains(r)]
        wanted = {str(lang).strip().lower() for lang in languages} if languages is not None else None
        keys: dict[str, set[str]] = defaultdict(set)
        for r in records:
            keys[r.language].add(r.prompt_key)
        left = {r.language for r in kept}
        for lang in sorted(keys):
            if (wanted is None or lang in wanted) and lang not in left:
                raise ShieldError(f"{source or 'data'}: no {lang!r} prompt falls in the {self.split} split "
                                  f"({len(keys[lang])} prompts, {self.flags()}); use a larger source, other "
                                  "fractions or --split all")
        return kept

    def provenance(self, records: Iterable["SafetyRecord"]) -> dict[str, Any]:
        """What the output JSONs record about the data a run used: the spec's fields, key count and digest."""
        keys = prompt_keys(records)
        return {**self.fields(), "prompt_keys": len(keys), "prompt_key_digest": keys_digest(keys)}


def prompt_keys(records: Iterable["SafetyRecord"]) -> list[str]:
    """The sorted distinct prompt keys of `records`."""
    return sorted({r.prompt_key for r in records})


def keys_digest(keys: Iterable[str]) -> str:
    """sha256 of the sorted distinct prompt keys, one per line."""
    return hashlib.sha256("".join(f"{k}\n" for k in sorted(set(keys))).encode("utf-8")).hexdigest()


SPLIT_PROVENANCE_KEYS = ("split", "test_fraction", "validation_fraction", "split_seed", "prompt_keys",
                         "prompt_key_digest")


def recorded_split_provenance(meta: dict[str, Any]) -> dict[str, Any]:
    """The `SplitSpec.provenance` entries an upstream output recorded (None where it recorded none), for outputs
    derived from it without reading the records again (the analysis of an identify directory)."""
    return {key: meta.get(key) for key in SPLIT_PROVENANCE_KEYS}


# --- provenance of a trained model ---------------------------------------------------------------

def trained_provenance(records: Iterable["SafetyRecord"], spec: SplitSpec, *, languages: Iterable[str] | None,
                       modalities: Iterable[str]) -> dict[str, Any]:
    """What a model trained on `records` carries (`write_provenance`); JSON-ready, e.g. for a patch's metadata."""
    return {"prompt_keys": prompt_keys(records), **spec.fields(),
            "languages": list(languages) if languages is not None else None, "modalities": list(modalities)}


def write_provenance(model_dir: str | os.PathLike, provenance: Mapping[str, Any]) -> Path:
    """Write `model_dir/shield_provenance.json` from `trained_provenance`: the prompt keys a model was trained on
    and how they were drawn.

    Every export of a trained model (patch, LoRA, full FFN) calls this, so evaluation can count the
    evaluated prompts the model was trained on (`read_provenance`).
    """
    keys = sorted(set(provenance["prompt_keys"]))
    path = Path(model_dir) / PROVENANCE_FILE
    write_json(path, {"format": PROVENANCE_FORMAT, "version": 1, "trained_prompt_keys": keys,
                      "prompt_key_digest": keys_digest(keys), **SplitSpec.from_fields(provenance).fields(),
                      "languages": provenance["languages"], "modalities": list(provenance["modalities"])})
    return path


def read_provenance(model_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The provenance a trained model carries, or None (a base model, a hub name)."""
    path = Path(model_dir) / PROVENANCE_FILE
    if not path.is_file():
        return None
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != PROVENANCE_FORMAT \
            or not isinstance(data.get("trained_prompt_keys"), list):
        raise ShieldError(f"{path}: not a shield-ds provenance file")
    return data


def trained_overlap(records: Iterable["SafetyRecord"], model: str | os.PathLike) -> int:
    """How many distinct prompt keys of `records` the model was trained on (0 for a model without provenance)."""
    provenance = read_provenance(model)
    if provenance is None:
        return 0
    return len(set(prompt_keys(records)) & set(provenance["trained_prompt_keys"]))


def overlap_note(eval_dirs: Iterable[str | os.PathLike], allow_overlap: bool) -> str:
    """"" when no evaluation in `eval_dirs` overlaps its model's trained prompts; OVERLAP_NOTE when one does
    and `allow_overlap`; otherwise a ShieldError naming the evaluation."""
    overlapping = False
    for directory in eval_dirs:
        path = Path(directory) / "asr.json"
        data = read_json(path) if path.is_file() else {}
        count = int(data.get("trained_overlap") or 0) if isinstance(data, dict) else 0
        if count and not allow_overlap:
            raise ShieldError(f"{directory}: {count} evaluated prompts were trained on (trained_overlap in asr.json); "
                              "evaluate on --split test (or validation) or pass --allow-overlap")
        overlapping = overlapping or bool(count)
    return OVERLAP_NOTE if overlapping else ""
