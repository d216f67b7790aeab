"""Tiny shards and tiny training configs shared by the trainer tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmforge.config import load_config
from lmforge.shards.format import ShardStats, build_manifest, write_manifest, write_shard
from lmforge.train.config import TrainConfig

VOCAB = 64
EOS = 0


def make_shards(folder: Path, n_docs: int = 120, seed: int = 0) -> Path:
    """Documents that count 1, 2, ..., 12, 1, 2, ... from a random start: an easy rule, so the loss falls fast."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    docs = []
    for _ in range(n_docs):
        token, doc = int(rng.integers(1, 13)), []
        for _ in range(int(rng.integers(20, 60))):
            doc.append(token)
            token = token % 12 + 1
        docs.append(np.array([*doc, EOS], dtype=np.int64))
    stats = ShardStats(docs=len(docs), tokens=sum(map(len, docs)))
    record = write_shard(folder, "web-00000", docs, np.dtype(np.uint16), stats, {"domain": "web"})
    write_manifest(folder, build_manifest([record], np.dtype(np.uint16), VOCAB, EOS, "f" * 64))
    return folder


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shards(tmp_path_factory.mktemp("train-shards") / "shards")


def tiny_data(run_dir: Path, shards: Path, **overrides: Any) -> dict[str, Any]:
    """A TrainConfig dict for a ~30K-parameter Llama-shaped model that trains in a fraction of a second."""
    data: dict[str, Any] = {
        "run_dir": str(run_dir),
        "model": {
            "vocab_size": VOCAB,
            "d_model": 32,
            "n_layers": 2,
            "n_heads": 4,
            "n_kv_heads": 2,
            "d_ff": 64,
            "max_seq_len": 64,
        },
        "data": {"shards": [str(shards)], "seq_len": 16},
        "max_steps": 12,
        "threads": 1,
        "optim": {"lr": 3e-3},
        "schedule": {"warmup_steps": 2},
        "batch": {"micro_batch_size": 4},
        "checkpoint": {"every_steps": 0, "export": False},
        "log": {"every_steps": 1, "progress": False, "plots": False},
    }
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return data


def tiny_config(run_dir: Path, shards: Path, **overrides: Any) -> TrainConfig:
    return load_config(TrainConfig, data=tiny_data(run_dir, shards, **overrides))
