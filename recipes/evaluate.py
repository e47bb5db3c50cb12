"""Stage 3 of Precise Shield: attack success rate per language x modality (and causal ablation).

    deepspeed --num_gpus 2 recipes/evaluate.py --model runs/train/model --out runs/eval-shielded \
        --compare runs/eval-base
    deepspeed --num_gpus 2 recipes/evaluate.py --model BASE --ablate runs/identify --out runs/ablation
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shield_ds.config import csv_list, parse_args  # noqa: E402
from shield_ds.errors import exit_on_error  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate answers, judge them, and tabulate ASR per language x modality.")
    p.add_argument("--model", default=None, help="checkpoint directory or hub name (default: the tiny llava demo model)")
    p.add_argument("--harmful", action="append", default=None, help="harmful prompts (repeatable; default multijail)")
    p.add_argument("--benign", action="append", default=None, help="benign prompts for over-refusal (default multiq)")
    p.add_argument("--languages", default=None)
    p.add_argument("--modalities", default="text,typographic")
    p.add_argument("--image", default=None, help="image file for the 'image' modality view")
    p.add_argument("--per-group-limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--judge", default=None, help="model judge (causal-LM guard or sequence classifier); default: refusal matcher")
    p.add_argument("--refusal-phrases", default=None, help="JSON/YAML file of extra refusal phrases per language")
    p.add_argument("--out", default="runs/evaluate")
    p.add_argument("--compare", default=None, help="an earlier evaluate --out directory (e.g. the base model's)")
    p.add_argument("--ablate", default=None, help="identify output: zero these neurons (plus random controls)")
    p.add_argument("--ablate-controls", type=int, default=3, help="random control sets for --ablate")
    p.add_argument("--ds-config", default="ds_configs/zero3_infer.json", help="DeepSpeed JSON, or 'none'")
    p.add_argument("--ds", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(build_parser(), argv)
    from shield_ds.defaults import default_model
    from shield_ds.engine import init_distributed
    from shield_ds.evaluate.evaluator import EvalConfig, Evaluator

    init_distributed()
    cfg = EvalConfig(
        model=args.model or str(default_model()), harmful=args.harmful or ["multijail"],
        benign=args.benign or ["multiq"], languages=csv_list(args.languages),
        modalities=csv_list(args.modalities) or ["text"], image=args.image, per_group_limit=args.per_group_limit,
        seed=args.seed, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, judge=args.judge,
        refusal_phrases=args.refusal_phrases, out=args.out, compare=args.compare, ablate=args.ablate,
        ablate_controls=args.ablate_controls,
        ds_config=None if str(args.ds_config).lower() == "none" else args.ds_config, ds_overrides=args.ds,
        data_dir=args.data_dir,
    )
    Evaluator(cfg).run()


if __name__ == "__main__":
    main()
