"""Stage 2 of Precise Shield: fine-tune only the safety neurons under ZeRO-3.

    deepspeed --num_gpus 2 recipes/train.py                # embedded default (runs/identify, shared data)
    deepspeed recipes/train.py --config configs/demo/train.yaml --max-steps 20

Baseline arms (same data, steps and schedule):
    deepspeed recipes/train.py --neurons random:1              # random neurons, per-layer counts of runs/identify
    deepspeed recipes/train.py --neurons random:1:runs/other   # ... of the set in runs/other (or --like-neurons DIR)
    deepspeed recipes/train.py --update lora --lora-budget match   # LoRA with about as many parameters as the set
    deepspeed recipes/train.py --update lora --lora-rank 8 --lora-targets q,v
    deepspeed recipes/train.py --update full-ffn               # every FFN matrix (upper bound)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shield_ds.config import add_data_args, add_engine_args, csv_ints, csv_list, data_kwargs, parse_args  # noqa: E402
from shield_ds.errors import exit_on_error  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fine-tune only the selected safety neurons (gate/up rows, down columns).")
    p.add_argument("--model", default=None, help="base checkpoint directory or hub name (default: the tiny llava demo model)")
    p.add_argument("--neurons", default=None,
                   help="an identify output directory (default runs/identify), or random:SEED[:LIKE_DIR] for random "
                        "neurons with the per-layer counts of LIKE_DIR's set (the control arm)")
    p.add_argument("--like-neurons", default=None,
                   help="for --neurons random:SEED without LIKE_DIR: the set to copy counts from (default runs/identify)")
    add_data_args(p, modalities="text", split="train")
    p.add_argument("--benign-targets", default="none", choices=["none", "self"],
                   help="'self': the base model answers benign prompts that have no response (cached in --out)")
    p.add_argument("--refusals", default=None, help="JSON/YAML file: language -> list of refusal templates")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="limit of self-generated benign answers (one that reaches it is cut back to its last sentence "
                        "end and trained without end of turn, or left out)")
    p.add_argument("--max-length", type=int, default=1024, help="cut training sequences to this many tokens (longer prompts are left out)")
    p.add_argument("--update", default="mask", choices=["mask", "delta", "lora", "full-ffn"],
                   help="mask/delta: train the selected neurons; lora, full-ffn: baseline arms (export model/ only)")
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (--update lora)")
    p.add_argument("--lora-budget", default=None, choices=["match"],
                   help="match: the LoRA rank whose trainable count is closest to the --neurons set's")
    p.add_argument("--lora-targets", default=None,
                   help="comma-separated decoder-layer projections for LoRA (default q,k,v,o,gate,up,down)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 * rank)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: --epochs)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the ds_config's)")
    p.add_argument("--schedule", default="constant", choices=["constant", "linear", "cosine"])
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--micro-batch-size", "--batch-size", type=int, default=4, dest="micro_batch_size")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N optimizer steps (0: only on preemption)")
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in --out (refused when that run's settings "
                        "differ in anything that changes the result)")
    p.add_argument("--resume-force", action="store_true",
                   help="with --resume: continue even when the settings differ (a warning names them); the "
                        "checkpoint gives the optimizer state and the schedule's position, this run the rest")
    p.add_argument("--out", default="runs/train")
    add_engine_args(p, ds_config="ds_configs/zero3_bf16.json", allow_none=False)
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward (large models)")
    p.add_argument("--no-export", action="store_true", help="skip writing model/ and the patch")
    p.add_argument("--export-steps", default=None,
                   help="comma-separated optimizer steps before the last at which to also export OUT/snapshots/step-N/ "
                        "(evaluate them for an ASR vs over-refusal curve along training)")
    return p


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(build_parser(), argv, embedded_default="train")
    from shield_ds.defaults import default_model
    from shield_ds.engine import init_distributed
    from shield_ds.train import ShieldTrainer, TrainConfig

    init_distributed()
    cfg = TrainConfig(
        model=args.model or str(default_model()), neurons=args.neurons, **data_kwargs(args),
        benign_targets=args.benign_targets, refusals=args.refusals, max_new_tokens=args.max_new_tokens,
        max_length=args.max_length, update=args.update, like_neurons=args.like_neurons, lora_rank=args.lora_rank,
        lora_budget=args.lora_budget, lora_targets=csv_list(args.lora_targets), lora_alpha=args.lora_alpha,
        max_steps=args.max_steps, epochs=args.epochs, lr=args.lr,
        schedule=args.schedule, warmup_steps=args.warmup_steps, micro_batch_size=args.micro_batch_size,
        grad_accum=args.grad_accum, save_every=args.save_every, keep_last=args.keep_last, resume=args.resume,
        resume_force=args.resume_force, out=args.out, ds_config=args.ds_config, ds_overrides=args.ds,
        export=not args.no_export, gradient_checkpointing=args.gradient_checkpointing,
        export_steps=csv_ints(args.export_steps, "--export-steps"),
    )
    ShieldTrainer(cfg).run()


if __name__ == "__main__":
    main()
