"""Stage 2 of Precise Shield: fine-tune only the safety neurons (gate/up rows, down columns) under ZeRO-3.

    deepspeed --num_gpus 2 recipes/train.py                # embedded default (runs/identify, shared data)
    deepspeed recipes/train.py --config configs/demo/train.yaml --max-steps 20

Baseline arms (same data, steps and schedule):
    deepspeed recipes/train.py --neurons random:1              # random neurons, per-layer counts of runs/identify
    deepspeed recipes/train.py --neurons random:1:runs/other   # ... of the set in runs/other (or --like-neurons DIR)
    deepspeed recipes/train.py --update lora --lora-budget match   # LoRA with about as many parameters as the set
    deepspeed recipes/train.py --update lora --lora-rank 8 --lora-targets q,v
    deepspeed recipes/train.py --update full-ffn               # every FFN matrix (upper bound)

Options: shield_ds.train.TrainConfig (`--help` lists them).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shield_ds.cli import parse_config  # noqa: E402
from shield_ds.process_group import exit_on_error  # noqa: E402
from shield_ds.train import ShieldTrainer, TrainConfig  # noqa: E402


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(TrainConfig, argv, embedded_default="train", description=__doc__, distributed=True)
    ShieldTrainer(cfg).run()


if __name__ == "__main__":
    main()
