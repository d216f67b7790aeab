"""A post-training run works on its own copy of the recipe; the caller's config is left as it was."""

from __future__ import annotations

import copy
import dataclasses

from lmforge.train import TrainConfig
from lmforge.tune.run import run_copy


def test_the_run_copy_records_the_tokenizer_and_leaves_the_callers_config() -> None:
    cfg = TrainConfig(init_from="runs/sft/model")
    before = copy.deepcopy(cfg)
    run = run_copy(cfg, progress=False, stability=dataclasses.replace(cfg.stability, spike_detection=False))
    assert cfg == before
    assert run.tokenizer == "runs/sft/model" and run.log.progress is False
    assert run.stability.spike_detection is False and cfg.stability.spike_detection is True
    assert run_copy(dataclasses.replace(cfg, tokenizer="tok"), progress=True).tokenizer == "tok"
