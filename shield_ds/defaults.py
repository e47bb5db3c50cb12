"""The embedded defaults (ground floor): where the tiny demo checkpoint lives and how to recognise one.
`shield_ds.models.tiny.default_model` builds it."""

from __future__ import annotations

import os
from pathlib import Path

from shield_ds.errors import ShieldError
from shield_ds.io import read_json

REPO_ROOT = Path(__file__).resolve().parents[1]
# Run outputs (runs/...) go under the checkout when the package runs from one (an editable install), else
# under the working directory, like every recipe's --out.
RUNS_ROOT = REPO_ROOT if (REPO_ROOT / "pyproject.toml").is_file() else Path.cwd()
DEFAULT_ARCH = "llava"
# config.json entry that marks a checkpoint built by shield_ds.models.tiny (random weights, byte-level
# tokenizer); exports of a trained tiny model copy the base's config.json, so they carry it too.
TINY_MARKER = "shield_ds_tiny"
TINY_NOTE = ("The model is one of the project's tiny generated checkpoints (random weights, a byte-level "
             "tokenizer): it shows the machinery, not the method. Its numbers do move: a trained arm can learn to "
             "emit the refusal template to every prompt (ASR near 0% with over-refusal near 100%), which says "
             "nothing about safety neurons; a difference between arms here is not evidence either way. Real "
             "models: `experiments/`.")


def default_model_dir() -> Path:
    """Where the tiny default checkpoint lives (env SHIELD_DS_DEFAULT_MODEL overrides)."""
    return Path(os.environ.get("SHIELD_DS_DEFAULT_MODEL", RUNS_ROOT / "runs" / "models" / f"tiny-{DEFAULT_ARCH}"))


def is_tiny_checkpoint(model: str | os.PathLike) -> bool:
    """Whether `model` is a tiny generated checkpoint: its config.json carries TINY_MARKER, or it is the
    embedded default's directory (built before the marker existed)."""
    path = Path(model)
    if (path / "config.json").is_file():
        try:
            config = read_json(path / "config.json")
        except ShieldError:
            return False
        if isinstance(config, dict) and config.get(TINY_MARKER):
            return True
    return path.exists() and path.resolve() == default_model_dir().resolve()
