"""The comparative experiment (arms x held-out prompts): `Experiment`, `ExperimentConfig`."""

from shield_ds.experiment.runner import ARMS, Arm, Experiment, ExperimentConfig, Stage

__all__ = ["ARMS", "Arm", "Experiment", "ExperimentConfig", "Stage"]
