"""Publish an experiment run as a committed, self-contained results page.

    python -m shield_ds.experiment.publish --run runs/real/smollm2-135m --out experiments/smollm2-135m
    python -m shield_ds.experiment.publish --run RUN --split validation --out experiments/NAME/validation

Writes OUT/RESULTS.md (how it was run: command, machine, wall time per stage; the arms table and
transfer from results.md; sample generations of every arm on the same prompts), copies the
results' csv and figures (`FIGURES`), and leaves weights and generations files behind. `--split` picks
which evaluations of the run to publish (`runner.split_name`; test by default).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from collections import Counter
from pathlib import Path

from shield_ds.errors import ShieldError
from shield_ds.process_group import ToolParser, exit_on_error
from shield_ds.evaluate.degenerate import degeneration
from shield_ds.experiment.runner import BUDGETS_DIR, Experiment, ExperimentConfig, SELECTIONS_DIR, split_name
from shield_ds.io import read_json, write_text
from shield_ds.evaluate.asr import read_generations

SAMPLE_LANGUAGES = ("en", "zh", "it", "sw", "th")
FIGURES = ("results.csv", "results.png", "budgets.png", "curves.csv", "curves.png")


def _stage_seconds(run: Path, config: dict) -> list[tuple[str, float, str]]:
    """(stage dir relative to `run`, seconds, code version) of the stages the recorded config plans (not those
    of a later command with more arms that is still running in the same directory)."""
    from dataclasses import fields


    known = {f.name for f in fields(ExperimentConfig)}
    cfg = ExperimentConfig(**{**{k: v for k, v in config.items() if k in known}, "out": str(run)})
    planned = {stage.out for stage in Experiment(cfg).plan()}
    rows = []
    for marker in sorted(run.rglob("stage.json")):
        if marker.parent in planned:
            stage = read_json(marker)
            rows.append((marker.parent.relative_to(run).as_posix(), float(stage.get("seconds", 0.0)),
                         _code_label(stage.get("code"))))
    return rows


def _code_label(code: dict | None) -> str:
    """`abc1234` for a clean checkout, `abc1234+changes` for one with uncommitted changes, or "not recorded"."""
    if not isinstance(code, dict) or not code.get("commit"):
        return "not recorded"
    return str(code["commit"])[:7] + ("+changes" if code.get("dirty") else "")


def _code_summary(stages: list[tuple[str, float, str]]) -> str:
    """Which code the stages ran: one label, or each label with its number of stages."""
    counts = Counter(label for _, _, label in stages)
    if not counts:
        return "not recorded"
    if len(counts) == 1:
        return f"{next(iter(counts))} (every stage)"
    return ", ".join(f"{label} ({n} stages)" for label, n in counts.most_common())


def _machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} CPU cores ({cpu}), no GPU; Python {platform.python_version()}, torch "
            f"{torch.__version__}")


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def sample_prompts(base_rows: list[dict], per_label: int = 5) -> list[dict]:
    """Prompts to show: per label, one per language of SAMPLE_LANGUAGES present (by a fixed hash order)."""
    chosen = []
    for label in ("harmful", "benign"):
        rows = sorted((r for r in base_rows if r["label"] == label),
                      key=lambda r: hashlib.sha256(str(r["id"]).encode()).hexdigest())
        langs = [lang for lang in SAMPLE_LANGUAGES if any(r["language"] == lang for r in rows)]
        for lang in langs[:per_label]:
            chosen.append(next(r for r in rows if r["language"] == lang))
    return chosen


def _success(row: dict) -> str:
    """An attack success, with why it is not an answer when it is not (echo, loop, no content)."""
    reason = degeneration(row["prompt"], row["response"])
    return f"attack succeeded ({reason})" if reason else "attack succeeded"


def sample_arms(run: Path, config: dict) -> dict[str, Path]:
    """Arm name -> eval dir of the arms whose answers the samples show: the main arms, then each other
    selection's (named as in the tables, `safety[NAME]`); not the budget sweep's (too many rows)."""
    eval_name = split_name("eval", config.get("eval_split", "test"))

    def evaluated(root: Path) -> list[str]:
        return sorted(p.name for p in root.iterdir() if (p / eval_name / "generations.jsonl").is_file()) \
            if root.is_dir() else []

    arms = {arm: run / "arms" / arm / eval_name for arm in evaluated(run / "arms")}
    for text in config.get("selections") or []:
        name = text.partition("=")[0].strip()
        root = run / SELECTIONS_DIR / name
        arms.update({f"{arm}[{name}]": root / arm / eval_name for arm in evaluated(root) if arm != "identify"})
    return arms


def samples_markdown(run: Path, arms: dict[str, Path], split: str = "test") -> str:
    """Each sample prompt with every arm's answer and verdict (`arms`: name -> eval dir; the base model's
    evaluation of `split`)."""
    evals = {"base": run / split_name("eval-base", split), **arms}
    rows = {name: {str(r["id"]): r for r in read_generations(d / "generations.jsonl")}
            for name, d in evals.items() if (d / "generations.jsonl").is_file()}
    out = []
    for prompt in sample_prompts(list(rows["base"].values())):
        out.append(f"**{prompt['label']}, {prompt['language']}:** {_short(prompt['prompt'], 240)}\n\n"
                   "| arm | verdict | answer (greedy, cut to the evaluation's --max-new-tokens) |\n| --- | --- | --- |\n")
        for name, by_id in rows.items():
            r = by_id.get(str(prompt["id"]))
            if r is None:
                continue
            verdict = ("refused" if r["refused"] else "answered") if prompt["label"] == "benign" else \
                (_success(r) if r["attack_success"] else "refused")
            out.append(f"| {name} | {verdict} | {_short(r['response'])} |\n")
        out.append("\n")
    return "".join(out)


def publish(run: Path, out: Path, notes: str | None = None, split: str = "test") -> Path:
    """Write OUT/RESULTS.md (+ the `FIGURES` the run has) from a finished experiment run's evaluations of `split`."""
    if not (run / split_name("results.md", split)).is_file():
        raise ShieldError(f"{run}: no {split_name('results.md', split)} (run recipes/experiment.py there first"
                          + (f" with --eval-split {split})" if split != "test" else ")"))
    config = read_json(run / split_name("experiment.json", split))["config"]
    stages = _stage_seconds(run, config)
    total = sum(s for _, s, _ in stages)
    extra = {what: sum(s for name, s, _ in stages if name.startswith(folder + "/"))
             for what, folder in (("budget sweep", BUDGETS_DIR), ("other selections", SELECTIONS_DIR))}
    breakdown = (f"; main arms {(total - sum(extra.values())) / 60:.1f} min"
             + "".join(f", {what} {s / 60:.1f} min" for what, s in extra.items() if s)) if any(extra.values()) else ""
    results = (run / split_name("results.md", split)).read_text(encoding="utf-8").split("\n", 1)[1]
    parts = [f"# Experiment: {Path(config['model']).name}\n\n",
             f"Command: `python recipes/experiment.py --config CONFIG` with the config recorded below; run dir "
             f"`{run}`.\n\nCode: {_code_summary(stages)}.\n\nMachine: {_machine()}.\n\nWall time of the stages: {total / 60:.1f} min{breakdown} "
             f"(launcher `{config['launcher']}`, evaluations `{config.get('eval_launcher') or config['launcher']}`).\n\n"]
    if notes:
        parts.append(Path(notes).read_text(encoding="utf-8").strip() + "\n\n")
    parts.append(f"## Arms on held-out {config.get('eval_split', 'test')} prompts\n" + results + "\n")
    parts.append("## Sample generations (the same prompts for every arm)\n\n" + samples_markdown(run, sample_arms(run, config), split))
    parts.append("## Stages\n\n| stage | seconds | code |\n| --- | --- | --- |\n"
                 + "".join(f"| {name} | {sec:.0f} | {code} |\n" for name, sec, code in stages))
    parts.append("\n## Config\n\n```json\n" + json.dumps(config, indent=2) + "\n```\n")
    out.mkdir(parents=True, exist_ok=True)
    for name in (split_name(figure, split) for figure in FIGURES):  # under the names results.md links
        if (run / name).is_file():
            shutil.copyfile(run / name, out / name)
    write_text(out / "RESULTS.md", "".join(parts))
    return out / "RESULTS.md"


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    p = ToolParser(prog="python -m shield_ds.experiment.publish", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, type=Path, help="an experiment --out directory")
    p.add_argument("--out", required=True, type=Path, help="where RESULTS.md goes (e.g. experiments/NAME)")
    p.add_argument("--notes", default=None, help="markdown file inserted after the header (findings)")
    p.add_argument("--split", choices=["test", "validation"], default="test",
                   help="which evaluations of the run (its --eval-split)")
    args = p.parse_args(argv)
    print(f"wrote {publish(args.run, args.out, args.notes, args.split)}")


if __name__ == "__main__":
    main()
