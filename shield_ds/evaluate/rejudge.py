"""Judge finished evaluations again without generating: `python -m shield_ds.evaluate.rejudge DIR [DIR ...]`.

Each DIR is an `evaluate.py --out` directory. Its generations get fresh `refused`, `attack_success` and
`judge` fields from the current refusal matcher (plus `--refusal-phrases`) or `--judge MODEL`; then
asr.csv / asr.json / the heatmap, evaluate.json's `asr` summary and, where evaluate compared with
another directory, compare.* are rewritten. Everything else in asr.json (split provenance, utility,
trained overlap) is kept. Every directory is read and checked before any file is written; a directory
that evaluate compared with is judged again before the comparison is rebuilt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shield_ds.data.splits import overlap_note
from shield_ds.errors import ShieldError
from shield_ds.process_group import ToolParser, exit_on_error
from shield_ds.evaluate.asr import (ASR_JSON, GENERATIONS_FILE, asr_table, compare, compare_page, overall,
                                    read_generations, write_asr_reports, write_generations)
from shield_ds.evaluate.judge_loader import load_judge
from shield_ds.evaluate.judges import Judge, annotate
from shield_ds.evaluate.refusal import RefusalMatcher
from shield_ds.io import read_json, write_json, write_text

EVALUATE_JSON = "evaluate.json"


def _read(directory: Path) -> tuple[list[dict], dict[str, Any], dict[str, Any]]:
    """(generations, asr.json, evaluate.json) of one evaluation directory; a ShieldError names what is missing."""
    for name in (GENERATIONS_FILE, ASR_JSON, EVALUATE_JSON):
        if not (directory / name).is_file():
            raise ShieldError(f"{directory}: no {name} (not a finished evaluate --out directory)")
    return read_generations(directory / GENERATIONS_FILE), read_json(directory / ASR_JSON), \
        read_json(directory / EVALUATE_JSON)


def rejudge(directories: list[Path], judge: Judge, matcher: RefusalMatcher) -> list[dict[str, Any]]:
    """Judge every directory's generations again and rewrite its reports; returns per directory the
    verdicts that changed ({"dir", "attack_success_changed", "refused_changed", "n"})."""

    loaded = {d: _read(d) for d in directories}
    comparisons = {}
    for directory, (_, _, evaluate_json) in loaded.items():
        base = (evaluate_json.get("config") or {}).get("compare")
        if base and (directory / "compare.json").is_file():
            if not (Path(base) / ASR_JSON).is_file():
                raise ShieldError(f"{directory}: compared with {base}, which has no {ASR_JSON}")
            comparisons[directory] = Path(base)
    changes = []
    for directory, (rows, asr_json, evaluate_json) in loaded.items():
        judged = annotate(rows, judge, matcher)
        table = asr_table(judged)
        meta = {k: v for k, v in asr_json.items() if k not in table.to_json()}
        write_generations(directory / GENERATIONS_FILE, judged)
        write_asr_reports(table, directory, meta=meta)
        write_json(directory / EVALUATE_JSON, {**evaluate_json, "asr": overall(judged)})
        changes.append({"dir": str(directory), "n": len(judged),
                        "attack_success_changed": sum(a["attack_success"] != b["attack_success"]
                                                      for a, b in zip(rows, judged)),
                        "refused_changed": sum(a["refused"] != b["refused"] for a, b in zip(rows, judged))})
    for directory, base in comparisons.items():  # evaluate already refused an overlap it did not allow
        note = overlap_note([directory, base], allow_overlap=True)
        write_text(directory / "compare.md", compare_page(compare(base, directory, out_dir=directory), note))
    return changes


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    p = ToolParser(prog="python -m shield_ds.evaluate.rejudge", description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", type=Path, help="evaluate --out directories")
    p.add_argument("--refusal-phrases", default=None, help="JSON/YAML file of extra refusal phrases per language")
    p.add_argument("--judge", default=None, help="model judge (causal-LM guard or sequence classifier); "
                                                 "default: the refusal matcher")
    args = p.parse_args(argv)
    matcher = RefusalMatcher.from_file(args.refusal_phrases) if args.refusal_phrases else RefusalMatcher()
    judge: Judge = matcher
    if args.judge:
        judge = load_judge(args.judge)
    for change in rejudge(args.dirs, judge, matcher):
        print(f"{change['dir']}: {change['attack_success_changed']} attack_success and {change['refused_changed']} "
              f"refused verdicts of {change['n']} changed")


if __name__ == "__main__":
    main()
