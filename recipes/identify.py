"""Stage 1 of Precise Shield: find safety neurons from harmful vs benign activation statistics.

    deepspeed --num_gpus 2 recipes/identify.py            # embedded default (tiny llava, shared data)
    python recipes/identify.py --model DIR --out runs/x   # one process, no launcher
    deepspeed recipes/identify.py --config configs/demo/identify.yaml --ratio 0.02
    deepspeed --num_gpus 8 recipes/identify.py --model BIG --zero on   # force ZeRO-3 (default: auto)

Options: shield_ds.neurons.identify.IdentifyConfig (`--help` lists them).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shield_ds.cli import parse_config  # noqa: E402
from shield_ds.process_group import exit_on_error  # noqa: E402
from shield_ds.neurons.identify import Identifier, IdentifyConfig  # noqa: E402


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(IdentifyConfig, argv, embedded_default="identify", description=__doc__, distributed=True)
    Identifier(cfg).run()


if __name__ == "__main__":
    main()
