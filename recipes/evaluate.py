"""Stage 3 of Precise Shield: attack success rate per language x modality (and causal ablation).

    deepspeed --num_gpus 2 recipes/evaluate.py --model runs/train/model --out runs/eval-shielded \
        --compare runs/eval-base
    deepspeed --num_gpus 2 recipes/evaluate.py --model BASE --ablate runs/identify --out runs/ablation
    deepspeed --num_gpus 8 recipes/evaluate.py --model BIG --zero on   # force ZeRO-3 (default: auto)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shield_ds.config import add_data_args, add_engine_args, data_kwargs, ds_config_arg, parse_args  # noqa: E402
from shield_ds.errors import exit_on_error  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate answers, judge them, and tabulate ASR per language x modality.")
    p.add_argument("--model", default=None, help="checkpoint directory or hub name (default: the tiny llava demo model)")
    add_data_args(p, modalities="text,typographic", split="test")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--judge", default=None, help="model judge (causal-LM guard or sequence classifier); default: refusal matcher")
    p.add_argument("--refusal-phrases", default=None, help="JSON/YAML file of extra refusal phrases per language")
    p.add_argument("--out", default="runs/evaluate")
    p.add_argument("--compare", default=None, help="an earlier evaluate --out directory (e.g. the base model's)")
    p.add_argument("--allow-overlap", action="store_true",
                   help="--compare even when the model was trained on evaluated prompts (titled as such)")
    p.add_argument("--reference-answers", default=None,
                   help="generations.jsonl whose benign answers the utility NLL scores "
                        "(default: --compare's generations, else this run's own)")
    p.add_argument("--ablate", default=None, help="identify output: zero these neurons (plus random controls)")
    p.add_argument("--ablate-controls", type=int, default=3, help="random control sets for --ablate")
    add_engine_args(p, ds_config="ds_configs/zero3_infer.json", allow_none=True, inference=True)
    return p


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(build_parser(), argv, embedded_default="evaluate")
    from shield_ds.defaults import default_model
    from shield_ds.engine import init_distributed
    from shield_ds.evaluate.evaluator import EvalConfig, Evaluator

    init_distributed()
    cfg = EvalConfig(
        model=args.model or str(default_model()), **data_kwargs(args), batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, judge=args.judge, refusal_phrases=args.refusal_phrases, out=args.out,
        compare=args.compare, allow_overlap=args.allow_overlap, reference_answers=args.reference_answers,
        ablate=args.ablate, ablate_controls=args.ablate_controls,
        ds_config=ds_config_arg(args.ds_config), ds_overrides=args.ds, zero=args.zero,
    )
    Evaluator(cfg).run()


if __name__ == "__main__":
    main()
