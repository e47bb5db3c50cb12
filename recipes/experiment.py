"""The comparative experiment: base vs safety neurons vs random neurons vs LoRA vs full FFN.

    python recipes/experiment.py --config configs/experiment.yaml          # tiny demo model, 2 CPU ranks
    python recipes/experiment.py --config configs/real/smollm2-135m.yaml  # a real model

Evaluates the base model on the test split, identifies safety neurons on the train split, trains
every arm on the trained languages x modalities, evaluates each on the test split of every
language x modality, and writes OUT/results.md, results.csv, results.png and transfer tables.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shield_ds.config import csv_ints, csv_list, parse_args  # noqa: E402
from shield_ds.errors import exit_on_error  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="base checkpoint (default: the tiny llava demo model)")
    p.add_argument("--out", default="runs/experiment")
    p.add_argument("--launcher", default="deepspeed --num_gpus 2", help="command that starts a recipe on the ranks")
    p.add_argument("--eval-launcher", default=None, help="launcher of the evaluations (default: --launcher)")
    p.add_argument("--train-languages", default="en,zh,it,vi", help="languages identify and train see")
    p.add_argument("--train-modalities", default="text", help="modalities identify and train see")
    p.add_argument("--eval-languages", default=None, help="languages to evaluate (default: all in the data)")
    p.add_argument("--eval-modalities", default="text", help="modalities to evaluate")
    p.add_argument("--arms", default="safety,random,lora,full-ffn", help="comma-separated: safety,random,lora,full-ffn")
    p.add_argument("--random-seeds", type=int, default=3, help="random-neuron arms (one per seed)")
    p.add_argument("--budgets", default=None, help="extra parameter budgets to sweep, e.g. 0.001,0.003,0.01")
    p.add_argument("--curve-steps", default=None,
                   help="optimizer steps before --max-steps at which every main arm is also exported and evaluated "
                        "(ASR vs over-refusal curves), e.g. 10,20")
    p.add_argument("--data-args", default="", help="flags for every stage (sources, --test-fraction, --split-seed)")
    p.add_argument("--identify-args", default="", help="extra flags for identify.py")
    p.add_argument("--train-args", default="", help="extra flags for train.py (every arm)")
    p.add_argument("--evaluate-args", default="", help="extra flags for evaluate.py")
    p.add_argument("--base-evaluate-args", default="", help="extra flags for the base evaluation only (e.g. --ablate DIR)")
    p.add_argument("--lora-args", default="--lora-budget match", help="flags of the LoRA arm")
    p.add_argument("--allow-overlap", action="store_true", help="tabulate evaluations on trained prompts (says so)")
    p.add_argument("--force", action="store_true", help="rerun stages that are already done")
    return p


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(build_parser(), argv)
    from shield_ds.defaults import default_model
    from shield_ds.experiment import Experiment, ExperimentConfig

    Experiment(ExperimentConfig(
        model=args.model or str(default_model()), out=args.out, launcher=args.launcher, eval_launcher=args.eval_launcher,
        train_languages=csv_list(args.train_languages) or [], train_modalities=csv_list(args.train_modalities) or [],
        eval_languages=csv_list(args.eval_languages), eval_modalities=csv_list(args.eval_modalities) or ["text"],
        arms=csv_list(args.arms) or [], random_seeds=args.random_seeds,
        budgets=[float(b) for b in csv_list(args.budgets) or []], curve_steps=csv_ints(args.curve_steps, "--curve-steps"),
        data_args=args.data_args,
        identify_args=args.identify_args, train_args=args.train_args, evaluate_args=args.evaluate_args,
        base_evaluate_args=args.base_evaluate_args,
        lora_args=args.lora_args, allow_overlap=args.allow_overlap, force=args.force,
    )).run()


if __name__ == "__main__":
    main()
