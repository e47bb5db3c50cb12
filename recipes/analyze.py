"""Analyse the safety neurons of an identify run: overlaps across languages and modalities, their p-values,
the shared core, the per-layer distribution (CSVs, PNGs and analysis.md).

    python recipes/analyze.py --neurons runs/identify [--out runs/identify/analysis]
"""

from __future__ import annotations

import argparse

from shield_ds.analysis.report import analyze_identify_dir
from shield_ds.dist import setup_logging
from shield_ds.errors import exit_on_error


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--neurons", required=True, help="identify output directory (neurons.* and sets/<name>/)")
    parser.add_argument("--out", default=None, help="output directory (default: NEURONS/analysis)")
    return parser.parse_args(argv)


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    result = analyze_identify_dir(args.neurons, args.out)
    print(f"wrote {len(result['files'])} files; summary: {result['files'][-1]}")


if __name__ == "__main__":
    main()
