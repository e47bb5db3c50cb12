"""The transfer experiment: shield on languages/modalities A, evaluate zero-shot on held-out B.

    python recipes/transfer.py --config configs/transfer.yaml
    python recipes/transfer.py --config configs/transfer.yaml --launcher "deepspeed --num_gpus 8"

Runs identify (A) -> evaluate the base (A + B) -> train (A) -> evaluate the shielded model (A + B)
as separate launches of the stage recipes, then writes OUT/transfer.md and OUT/transfer.csv: ASR
before and after for every held-out group (a language or modality of B not in A).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shield_ds.config import csv_list, parse_args  # noqa: E402
from shield_ds.errors import ShieldError, exit_on_error  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="base checkpoint (default: the tiny llava demo model)")
    p.add_argument("--harmful", action="extend", nargs="+", default=None)
    p.add_argument("--benign", action="extend", nargs="+", default=None)
    p.add_argument("--train-languages", required=False, default=None, help="A: languages to identify and train on")
    p.add_argument("--train-modalities", default="text", help="A: modalities to identify and train on")
    p.add_argument("--eval-languages", default=None, help="A + B: languages to evaluate (default: all)")
    p.add_argument("--eval-modalities", default="text,typographic", help="A + B: modalities to evaluate")
    p.add_argument("--out", default="runs/transfer")
    p.add_argument("--launcher", default="deepspeed --num_gpus 2", help="command that starts a recipe on the ranks")
    p.add_argument("--identify-args", default="", help="extra flags for identify.py")
    p.add_argument("--train-args", default="", help="extra flags for train.py")
    p.add_argument("--evaluate-args", default="", help="extra flags for evaluate.py")
    p.add_argument("--allow-overlap", action="store_true",
                   help="table evaluations on prompts the model was trained on (titled as such)")
    return p


def run_stage(launcher: str, recipe: str, args: list[str]) -> None:
    cmd = [*shlex.split(launcher), str(REPO / "recipes" / recipe), *args]
    if cmd[0] in ("python", "python3"):  # the interpreter running this script (its environment has torch)
        cmd[0] = sys.executable
    print("==", " ".join(shlex.quote(c) for c in cmd), flush=True)
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        raise ShieldError(f"transfer: stage {recipe} failed (see its output above)")


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(build_parser(), argv)
    from shield_ds.defaults import default_model
    from shield_ds.data.splits import overlap_note
    from shield_ds.evaluate.asr import load_asr, rows_to_csv, transfer_markdown, transfer_table
    from shield_ds.io import write_text

    if not args.train_languages:
        raise ShieldError("--train-languages is required (the languages A that identify and train see)")
    out = Path(args.out)
    model = args.model or str(default_model())
    data = [*(["--harmful", *args.harmful] if args.harmful else []), *(["--benign", *args.benign] if args.benign else [])]
    train_sel = ["--languages", args.train_languages, "--modalities", args.train_modalities]
    eval_sel = [*(["--languages", args.eval_languages] if args.eval_languages else []),
                "--modalities", args.eval_modalities]
    run_stage(args.launcher, "identify.py", ["--model", model, *data, *train_sel, "--out", str(out / "identify"),
                                             "--overwrite", *shlex.split(args.identify_args)])
    run_stage(args.launcher, "evaluate.py", ["--model", model, *data, *eval_sel, "--out", str(out / "eval-base"),
                                             *shlex.split(args.evaluate_args)])
    run_stage(args.launcher, "train.py", ["--model", model, "--neurons", str(out / "identify"), *data, *train_sel,
                                          "--out", str(out / "train"), *shlex.split(args.train_args)])
    run_stage(args.launcher, "evaluate.py", ["--model", str(out / "train" / "model"), *data, *eval_sel,
                                             "--out", str(out / "eval-shielded"), "--compare", str(out / "eval-base"),
                                             "--allow-overlap", *shlex.split(args.evaluate_args)])
    # the overlap is refused here, after the stages and before the tables, in one line naming it
    note = overlap_note([out / "eval-base", out / "eval-shielded"], args.allow_overlap)
    before, after = load_asr(out / "eval-base"), load_asr(out / "eval-shielded")
    trained_langs, trained_mods = set(csv_list(args.train_languages)), set(csv_list(args.train_modalities))
    held = [f"lang-{lang}" for lang in before.languages if lang not in trained_langs]
    held += [f"modality-{mod}" for mod in before.modalities if mod not in trained_mods]
    rows = transfer_table(before, after, held)
    text = (f"# Transfer: trained on languages {args.train_languages}, modalities {args.train_modalities}"
            f"{' ' + note if note else ''}\n\n"
            + transfer_markdown(rows) + "\n")
    write_text(out / "transfer.md", text)
    write_text(out / "transfer.csv", rows_to_csv(rows))
    print(text, flush=True)


if __name__ == "__main__":
    main()
