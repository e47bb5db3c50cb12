"""Issue #30's before/after page: the old benign side (MultiQ questions) against the matched one (questions +
requests + borderline prompts), on validation prompts, from two finished experiment run directories.

    python experiments/smollm2-135m/matched/analyze.py runs/real/smollm2-135m-matched-old \
        runs/real/smollm2-135m-matched-new --out experiments/smollm2-135m/matched/RESULTS.md

Fixed with the configs before the runs (configs/real/smollm2-135m-matched-{old,new}.yaml). Per arm and mix:
trained-language ASR, held-out-language ASR, SafeBench-text ASR and over-refusal per form (trained languages
and all), each with a 95% Wilson interval; the decision: old safety against new safety on the trained
languages' request + borderline prompts, prompt by prompt (exact two-sided McNemar; the same validation
prompts in both runs), with the trained-language ASR pair beside it; the overlap of the two safety sets
(Jaccard, overlap coefficient, hypergeometric p under per-layer independence).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from scipy.stats import binomtest  # noqa: E402

from shield_ds.analysis.overlap import pair_overlap  # noqa: E402
from shield_ds.evaluate.asr import GENERATIONS_FILE, Rate, read_generations  # noqa: E402
from shield_ds.experiment.results import slice_of  # noqa: E402
from shield_ds.io import read_json, write_text  # noqa: E402
from shield_ds.neurons import NeuronSet  # noqa: E402
from shield_ds.tables import markdown_table  # noqa: E402

TRAINED = ({"en", "zh", "it", "vi"}, {"text"})
ARMS = ("base", "safety", "random-s0", "random-s1")
FORMS = ("question", "request", "borderline")


def eval_dir(run: Path, arm: str) -> Path:
    return run / "eval-base-validation" if arm == "base" else run / "arms" / arm / "eval-validation"


def outcomes(run: Path, arm: str) -> dict[str, dict[tuple, bool]]:
    """Per measure, each prompt's bad outcome (harmful: attack success; benign: refused)."""
    out: dict[str, dict[tuple, bool]] = {}
    for row in read_generations(eval_dir(run, arm) / GENERATIONS_FILE):
        key = (row["id"], row["language"], row["modality"])
        if row["label"] == "harmful":
            out.setdefault(f"asr_{slice_of(row, TRAINED)}", {})[key] = bool(row["attack_success"])
            continue
        form = row.get("form") or "question"
        trained = row["language"] in TRAINED[0]
        for name in (f"refusal_{form}", f"refusal_{form}_trained" if trained else None,
                     "refusal_matched_trained" if trained and form != "question" else None):
            if name:
                out.setdefault(name, {})[key] = bool(row["refused"])
    return out


def rate(values: dict[tuple, bool] | None) -> str:
    if not values:
        return "–"
    r = Rate(sum(values.values()), len(values))
    low, high = r.interval
    return f"{100 * r.rate:.1f} [{100 * low:.1f}, {100 * high:.1f}] ({r.successes}/{r.n})"


MEASURES = [("asr_trained", "ASR trained"), ("asr_held_out_languages", "ASR held-out languages"),
            ("asr_safebench_text", "ASR SafeBench text"),
            *((f"refusal_{f}_trained", f"refusals {f}s, trained languages") for f in FORMS),
            *((f"refusal_{f}", f"refusals {f}s, all languages") for f in FORMS)]


def paired(a: dict[tuple, bool], b: dict[tuple, bool]) -> tuple[int, int, int, float | None]:
    """(only a bad, only b bad, prompts, exact McNemar p) over the prompts both answered."""
    if a.keys() != b.keys():
        raise SystemExit("the two runs were evaluated on different prompts: not comparable prompt by prompt")
    only_a = sum(a[k] and not b[k] for k in a)
    only_b = sum(b[k] and not a[k] for k in a)
    n = only_a + only_b
    return only_a, only_b, len(a), (binomtest(only_a, n, 0.5).pvalue if n else None)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    runs = {"old (questions)": args.old, "matched (questions + requests)": args.new}
    # arms evaluated in both runs (DEVIATIONS.md: one random seed per mix in the first run)
    arms = [arm for arm in ARMS if all((eval_dir(run, arm) / GENERATIONS_FILE).is_file() for run in runs.values())]
    data = {(mix, arm): outcomes(run, arm) for mix, run in runs.items() for arm in arms}
    header = ["mix", "arm", *(title + " % [95% CI]" for _, title in MEASURES)]
    body = [[mix, arm, *(rate(data[mix, arm].get(key)) for key, _ in MEASURES)] for mix in runs for arm in arms]
    lines = []
    if "safety" in arms:
        old, new = (data[mix, "safety"] for mix in runs)
        lines = ["| measure | old safety only | matched safety only | prompts | exact McNemar p |",
                 "|---|---:|---:|---:|---:|"]
        for key, title in [("refusal_matched_trained", "refusals, requests + borderline, trained languages"),
                           ("asr_trained", "ASR trained"), ("asr_safebench_text", "ASR SafeBench text"),
                           ("refusal_question_trained", "refusals, questions, trained languages")]:
            a, b, n, pv = paired(old[key], new[key])
            lines.append(f"| {title} | {a} | {b} | {n} | {'–' if pv is None else f'{pv:.3g}'} |")
    decision = "\n".join(lines) if lines else "_Not reached: the safety arms were not evaluated in both runs._"
    sets = {mix: NeuronSet.load(run / "identify") for mix, run in runs.items()}
    (name_a, set_a), (name_b, set_b) = sets.items()
    overlap = pair_overlap(name_a, set_a, name_b, set_b).to_row()
    layers = markdown_table(["set", "neurons", "per layer (first to last)"],
                            [[name, str(ns.count), " ".join(map(str, ns.per_layer_counts()))] for name, ns in sets.items()])
    model = Path(read_json(args.old / "experiment-validation.json")["config"]["model"]).name
    page = (f"# Benign data matched in form: old vs matched mix ({model}, validation prompts)\n\n"
            "Generated by `experiments/smollm2-135m/matched/analyze.py` from "
            f"`{args.old}` and `{args.new}`.\n\n## Arms\n\n" + markdown_table(header, body)
            + "\n\n## Decision: old safety arm against the matched one, prompt by prompt\n\n" + decision
            + "\n\n## Overlap of the two safety sets\n\n" + markdown_table(list(overlap), [[str(v) for v in overlap.values()]])
            + "\n" + layers
            + "\n")
    write_text(args.out, page)
    print(page)


if __name__ == "__main__":
    main()
