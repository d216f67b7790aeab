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

from lmforge.lazy import lazy_exports

_EXPORTS = {
    "LMObjective": "lmforge.train.objective",
    "Objective": "lmforge.train.objective",
    "ObjectiveOutput": "lmforge.train.objective",
    "TrainConfig": "lmforge.train.config",
    "TrainResult": "lmforge.train.trainer",
    "Trainer": "lmforge.train.trainer",
    "TrainingError": "lmforge.train.trainer",
    "build_model": "lmforge.train.trainer",
    "train": "lmforge.train.trainer",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
