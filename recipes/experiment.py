"""The comparative experiment: base vs safety neurons vs random neurons vs LoRA vs full FFN.

    python recipes/experiment.py --config configs/experiment.yaml          # tiny demo model, 2 CPU ranks
    python recipes/experiment.py --config configs/real/smollm2-135m.yaml  # a real model

Evaluates the base model on the test split, identifies safety neurons on the train split, trains
every arm on the trained languages x modalities, evaluates each on the test split of every
language x modality, and writes OUT/results.md, results.csv, results.png and transfer tables.
Options: shield_ds.experiment.runner.ExperimentConfig (`--help` lists them).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shield_ds.cli import parse_config  # noqa: E402
from shield_ds.process_group import exit_on_error  # noqa: E402
from shield_ds.experiment import Experiment, ExperimentConfig  # noqa: E402


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    Experiment(parse_config(ExperimentConfig, argv, description=__doc__)).run()


if __name__ == "__main__":
    main()
