"""The run's own copy of a post-training recipe: what a run records and trains with, leaving the caller's
config object as it was given."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from lmforge.train import TrainConfig

C = TypeVar("C", bound=TrainConfig)


def run_copy(cfg: C, progress: bool, **changes: Any) -> C:
    """``cfg`` with the tokenizer recorded as the one used (``cfg.tokenizer``, else the model folder's, so it
    is exported next to the model), console progress only when ``progress`` allows it, and ``changes``."""
    log = dataclasses.replace(cfg.log, progress=cfg.log.progress and progress)
    return dataclasses.replace(cfg, tokenizer=str(cfg.tokenizer or cfg.init_from), log=log, **changes)
