"""Stage 3 of Precise Shield: attack success rate per language x modality (and causal ablation).

    deepspeed --num_gpus 2 recipes/evaluate.py --model runs/train/model --out runs/eval-shielded \
        --compare runs/eval-base
    deepspeed --num_gpus 2 recipes/evaluate.py --model BASE --ablate runs/identify --out runs/ablation
    deepspeed --num_gpus 8 recipes/evaluate.py --model BIG --zero on   # force ZeRO-3 (default: auto)

Options: shield_ds.evaluate.evaluator.EvalConfig (`--help` lists them).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shield_ds.cli import parse_config  # noqa: E402
from shield_ds.process_group import exit_on_error  # noqa: E402
from shield_ds.evaluate.evaluator import EvalConfig, Evaluator  # noqa: E402


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(EvalConfig, argv, embedded_default="evaluate", description=__doc__, distributed=True)
    Evaluator(cfg).run()


if __name__ == "__main__":
    main()
