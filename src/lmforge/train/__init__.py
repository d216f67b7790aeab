"""The one trainer: optimizers, schedules, precision, checkpoints, stability and parallelism.

Python::

    from lmforge.config import load_config
    from lmforge.train import TrainConfig, train
    result = train(load_config(TrainConfig, "recipes/train/tiny-cpu.yaml"))  # -> TrainResult
    result.model_dir, result.metrics["loss"], result.val_loss

Command line (one process, or one per device under torchrun)::

    lmforge train --config recipes/train/tiny-cpu.yaml max_steps=200
    torchrun --nproc_per_node 4 -m lmforge.cli train --config R.yaml parallel.dp_mode=fsdp parallel.tp=2

Post-training plugs in an :class:`Objective` (and its own batch source) into the same loop:
``train(cfg, objective=..., train_data=..., val_data=...)``.
"""

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
