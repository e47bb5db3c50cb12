"""Print a table of records per language x label x modality for a set of data sources.

    python -m shield_ds.data.summary                       # MultiJail + MultiQ + FigStep SafeBench
    python -m shield_ds.data.summary --harmful my.jsonl --benign multiq --modalities text,typographic
"""

from __future__ import annotations

from collections import Counter

from shield_ds.data.layouts import load_source
from shield_ds.data.records import LABELS, MODALITIES, SafetyRecord
from shield_ds.data.selection import with_modalities
from shield_ds.process_group import ToolParser, exit_on_error


def count_table(records: list[SafetyRecord]) -> str:
    """A fixed-width table: one row per language, one column per label x modality present."""
    counts = Counter((r.language, r.label, r.modality) for r in records)
    columns = [(label, modality) for label in LABELS for modality in MODALITIES
               if any(k[1:] == (label, modality) for k in counts)]
    languages = sorted({k[0] for k in counts})
    headers = ["lang"] + [f"{label}/{modality}" for label, modality in columns] + ["total"]
    rows = [[lang] + [str(counts[(lang, *col)]) for col in columns]
            + [str(sum(counts[(lang, *col)] for col in columns))] for lang in languages]
    rows.append(["all"] + [str(sum(counts[(lang, *col)] for lang in languages)) for col in columns]
                + [str(len(records))])
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    fmt = lambda row: "  ".join(cell.rjust(w) for cell, w in zip(row, widths))  # noqa: E731
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths]), *map(fmt, rows)])


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    p = ToolParser(prog="python -m shield_ds.data.summary", description=__doc__.splitlines()[0])
    p.add_argument("--harmful", action="extend", nargs="+", default=None)
    p.add_argument("--benign", action="extend", nargs="+", default=None)
    p.add_argument("--modalities", default="text,typographic", help="views of text records to count")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    modalities = [m.strip() for m in args.modalities.split(",") if m.strip()] or ["text"]
    records: list[SafetyRecord] = []
    for specs, label in ((args.harmful or ["multijail", "figstep"], "harmful"), (args.benign or ["multiq"], "benign")):
        for spec in specs:
            records += with_modalities(load_source(spec, label=label, data_dir=args.data_dir), modalities)
    print(count_table(records))


if __name__ == "__main__":
    main()
