"""Analyse the safety neurons of an identify run: overlaps across languages and modalities, their p-values,
the shared core, the per-layer distribution (CSVs, PNGs and analysis.md).

    python recipes/analyze.py --neurons runs/identify [--out runs/identify/analysis]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shield_ds.cli import parse_config  # noqa: E402
from shield_ds.config import option  # noqa: E402
from shield_ds.process_group import exit_on_error  # noqa: E402
from shield_ds.analysis.report import analyze_identify_dir  # noqa: E402


@dataclass
class AnalyzeConfig:
    neurons: str = option(help="identify output directory (neurons.* and sets/<name>/)")
    out: str | None = option(None, "output directory (default: NEURONS/analysis)")


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(AnalyzeConfig, argv, description=__doc__)
    result = analyze_identify_dir(cfg.neurons, cfg.out)
    print(f"wrote {len(result['files'])} files; summary: {result['files'][-1]}")


if __name__ == "__main__":
    main()
