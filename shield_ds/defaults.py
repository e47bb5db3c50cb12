"""The embedded defaults: the tiny demo checkpoint and the shared data directory."""

from __future__ import annotations

import os
from pathlib import Path

from shield_ds import dist
from shield_ds.io import atomic_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARCH = "llava"


def default_model_dir() -> Path:
    """Where the tiny default checkpoint lives (env SHIELD_DS_DEFAULT_MODEL overrides)."""
    return Path(os.environ.get("SHIELD_DS_DEFAULT_MODEL", REPO_ROOT / "runs" / "models" / f"tiny-{DEFAULT_ARCH}"))


def default_model() -> Path:
    """The tiny default checkpoint, built (seeded, identical every time) by rank 0 on first use."""
    from shield_ds.models.tiny import build_tiny

    path = default_model_dir()
    if not (path / "config.json").exists() and dist.is_rank0():
        with atomic_dir(path) as tmp:
            build_tiny(DEFAULT_ARCH, tmp)
    dist.barrier()
    return path
