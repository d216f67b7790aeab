"""Out-of-range and inconsistent recipes are ConfigErrors naming the key, raised before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.config import ConfigError, load_config
from lmforge.train import Trainer
from lmforge.train.config import TrainConfig
from tests.train.conftest import tiny_config, tiny_data


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"schedule.warmup_steps": -5}, "schedule.warmup_steps"),
        ({"schedule.warmup_fraction": 1.5}, "schedule.warmup_fraction"),
        ({"optim.lr": float("nan")}, "optim.lr"),
        ({"optim.lr": float("inf")}, "optim.lr"),
        ({"optim.lr": 0.0}, "optim.lr"),
        ({"optim.betas": [0.9, 1.0]}, r"optim.betas\[1\]"),
        ({"optim.eps": 0.0}, "optim.eps"),
        ({"optim.weight_decay": -0.1}, "optim.weight_decay"),
        ({"optim.grad_clip": float("nan")}, "optim.grad_clip"),
        ({"batch.micro_batch_size": 0}, "batch.micro_batch_size"),
        ({"batch.ramp_tokens": -1}, "batch.ramp_tokens"),
        ({"checkpoint.every_steps": -1}, "checkpoint.every_steps"),
        ({"stability.z_threshold": 0.0}, "stability.z_threshold"),
        ({"stability.max_rollbacks": -1}, "stability.max_rollbacks"),
        ({"stability.rollback_window": 0}, "stability.rollback_window"),
        ({"stability.skip_batches": -1}, "stability.skip_batches"),
        ({"log.every_steps": 0}, "log.every_steps"),
        ({"log.val_batches": 0}, "log.val_batches"),
        ({"threads": 0}, "threads"),
        ({"model.dropout": 1.0}, "model.dropout"),
        ({"model.norm_eps": 0.0}, "model.norm_eps"),
        ({"model.rope_theta": -1.0}, "model.rope_theta"),
        ({"model.init_std": float("nan")}, "model.init_std"),
        ({"data.seed": -1}, "data.seed"),
        ({"data.split_seed": -1}, "data.split_seed"),
        ({"data.seq_len": 128}, "data.seq_len"),  # longer than model.max_seq_len=64 (RoPE)
        ({"data.seq_len": 128, "model.position": "learned"}, "data.seq_len"),
        ({"data.curriculum": [{"tokens": 64, "seq_len": 16}, {"seq_len": 128}]}, r"data.curriculum"),
    ],
)
def test_out_of_range_values_are_config_errors_naming_the_key(
    tmp_path: Path, shards: Path, overrides: dict, key: str
) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}"):
        load_config(TrainConfig, data=tiny_data(tmp_path / "run", shards, **overrides))


def test_a_preset_that_is_too_short_for_the_data_is_refused_before_anything_is_written(
    tmp_path: Path, shards: Path
) -> None:
    cfg = tiny_config(tmp_path / "run", shards, init_from="tiny-llama", **{"data.seq_len": 512})
    with pytest.raises(ConfigError, match=r"data\.seq_len.*model\.max_seq_len=256"):
        Trainer(cfg).fit()
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="init_from"):
        Trainer(tiny_config(tmp_path / "run", shards, init_from="no-such-preset"))


def test_a_model_vocabulary_smaller_than_the_shards_is_refused_before_training(
    tmp_path: Path, shards: Path
) -> None:
    cfg = tiny_config(tmp_path / "run", shards, **{"model.vocab_size": 32})  # the shards' vocabulary: 64
    with pytest.raises(ConfigError, match=r"model\.vocab_size: 32 .* \(64 tokens\)"):
        Trainer(cfg)
    # held-out shards are checked up front too, not at the first validation
    overrides = {"model.vocab_size": 32, "val_shards": [str(shards)]}
    with pytest.raises(ConfigError, match=r"model\.vocab_size: 32 .*\(64 tokens\)"):
        Trainer(tiny_config(tmp_path / "run", shards, **overrides), train_data=iter([]))
    assert not (tmp_path / "run").exists()


def test_a_model_vocabulary_smaller_than_the_tokenizer_is_refused_before_training(
    tmp_path: Path, shards: Path
) -> None:
    from lmforge.tokenizer import TokenizerTrainConfig, train_tokenizer

    texts = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs"] * 20
    tokenizer = train_tokenizer(texts, TokenizerTrainConfig(vocab_size=300, min_frequency=1))
    tokenizer.save(tmp_path / "tokenizer")
    cfg = tiny_config(tmp_path / "run", shards, tokenizer=str(tmp_path / "tokenizer"))
    with pytest.raises(ConfigError, match=rf"model\.vocab_size: 64 .*tokenizer.*\({len(tokenizer)} tokens\)"):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()
