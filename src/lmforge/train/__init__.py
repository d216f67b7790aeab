"""The one trainer: optimizers, schedules, precision, checkpoints, stability and parallelism."""

from lmforge.train.config import TrainConfig
from lmforge.train.objective import LMObjective, Objective, ObjectiveOutput
from lmforge.train.trainer import Trainer, TrainingError, TrainResult, build_model, train

__all__ = [
    "LMObjective",
    "Objective",
    "ObjectiveOutput",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingError",
    "build_model",
    "train",
]
