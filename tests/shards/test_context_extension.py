"""Multi-stage context extension: curriculum stages that change the model's context settings."""

import json

import pytest
import torch

from lmforge.config import ConfigError
from lmforge.model.rope_scaling import rope_frequencies
from lmforge.shards.curriculum import CurriculumStage, model_overrides
from tests.train.conftest import make_shards, tiny_config


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("ext-shards") / "shards", n_docs=60)


def test_model_overrides_fold_over_the_stages():
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    stages = [
        CurriculumStage(name="a", tokens=10, seq_len=256),
        CurriculumStage(
            name="b",
            tokens=10,
            seq_len=1024,
            max_seq_len=1024,
            rope_scaling={"rope_type": "linear", "factor": 4.0},
        ),
        CurriculumStage(name="c", seq_len=4096, max_seq_len=4096, rope_theta=50000.0, rope_scaling=yarn),
    ]
    assert model_overrides(stages[:1]) == {}
    assert model_overrides(stages[:2]) == {
        "max_seq_len": 1024,
        "rope_scaling": {"rope_type": "linear", "factor": 4.0},
    }
    assert model_overrides(stages) == {"max_seq_len": 4096, "rope_theta": 50000.0, "rope_scaling": yarn}
    off = CurriculumStage(name="d", rope_scaling={"rope_type": "default"})
    assert model_overrides([*stages, off]) == {
        "max_seq_len": 4096,
        "rope_theta": 50000.0,
        "rope_scaling": None,
    }
    with pytest.raises(ValueError, match="max_seq_len"):
        CurriculumStage(name="bad", max_seq_len=-1)


def test_a_stage_must_extend_the_context_to_use_longer_sequences(tmp_path, shards):
    short = {"name": "short", "tokens": 256, "seq_len": 16}
    with pytest.raises(ConfigError, match=r"data\.curriculum\[1\]\.seq_len: sequences of 128 tokens"):
        tiny_config(tmp_path, shards, **{"data.curriculum": [short, {"seq_len": 128}]})
    tiny_config(tmp_path, shards, **{"data.curriculum": [short, {"seq_len": 128, "max_seq_len": 128}]})
    bad = {"seq_len": 128, "max_seq_len": 128, "rope_scaling": {"rope_type": "linear"}}
    with pytest.raises(ConfigError, match=r"data\.curriculum\[1\]: rope_scaling\.factor"):
        tiny_config(tmp_path, shards, **{"data.curriculum": [short, bad]})
    learned = {"model.position": "learned", "data.curriculum": [short, {"seq_len": 128, "max_seq_len": 128}]}
    with pytest.raises(ConfigError, match="learned positions cannot be extended"):
        tiny_config(tmp_path, shards, **learned)


def test_two_stage_run_extends_the_context_with_position_interpolation(tmp_path, shards):
    from lmforge.model.hf import load_pretrained
    from lmforge.train.trainer import Trainer

    linear = {"rope_type": "linear", "factor": 4.0}
    stages = [
        {"name": "base", "tokens": 3 * 4 * 16, "seq_len": 16},
        {"name": "extend", "seq_len": 64, "max_seq_len": 64, "rope_scaling": linear},
    ]
    overrides = {"model.max_seq_len": 16, "data.curriculum": stages, "checkpoint.export": True}
    cfg = tiny_config(tmp_path / "run", shards, max_steps=5, **overrides)
    seen = []
    trainer = Trainer(
        cfg, batch_hook=lambda step, batch: seen.append((step, batch["input_ids"].shape[1])) or batch
    )
    base_freq = rope_frequencies(trainer.model.cfg, None, "cpu")[0]
    result = trainer.fit()
    assert [length for _, length in seen] == [16] * 3 + [64] * 2
    # the last forwards ran with the stage's settings: positions interpolated, frequencies divided by 4
    assert trainer.model.cfg.max_seq_len == 64 and trainer.model.cfg.rope_scaling == linear
    inv_freq = trainer.model._rope_memo[1][0]
    torch.testing.assert_close(inv_freq.cpu(), base_freq / 4)
    events = [json.loads(x) for x in (result.run_dir / "events.jsonl").read_text().splitlines()]
    assert [e for e in events if e["event"] == "stage_model"] == [
        {"event": "stage_model", "step": 3, "stage": 1, "max_seq_len": 64, "rope_scaling": linear}
    ]
    exported = load_pretrained(result.model_dir).cfg
    assert exported.max_seq_len == 64 and exported.rope_scaling == linear
    assert cfg.model.max_seq_len == 16  # the recipe itself is left as given
