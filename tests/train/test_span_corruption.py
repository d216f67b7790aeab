"""Span corruption (T5's random_spans_noise_mask and sentinel replacement) and an encoder-decoder trained through
the one trainer on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from lmforge.model.hf import load_pretrained
from lmforge.model.t5 import T5Config, T5Model
from lmforge.shards.loader import PackedLoader
from lmforge.train.metrics import read_jsonl
from lmforge.train.span_corruption import (
    Seq2SeqObjective,
    SpanCorruptionBatches,
    first_sentinel_id,
    noise_counts,
    random_spans_noise_mask,
    span_corrupt,
)
from lmforge.train.trainer import Trainer

from .conftest import VOCAB, tiny_config


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of each run of True."""
    runs, start = [], None
    for i, m in enumerate([*mask, False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


@pytest.mark.parametrize("length", [2, 7, 20, 64, 100, 512, 568])
def test_noise_mask_has_the_published_counts(length):
    rng = np.random.default_rng(0)
    n_noise, n_spans = noise_counts(length)
    # T5: round(L * 0.15) noise tokens (at least 1, at most L - 1), round(noise / 3) spans (at least 1)
    assert n_noise == min(max(round(length * 0.15), 1), max(length, 2) - 1)
    assert n_spans == max(round(n_noise / 3), 1)
    for _ in range(20):
        mask = random_spans_noise_mask(length, rng)
        assert mask.shape == (length,) and mask.dtype == bool
        assert int(mask.sum()) == n_noise
        assert len(_runs(mask)) == n_spans
        assert not mask[0] and mask[-1]  # T5's mask starts with non-noise and ends with noise


def test_published_values_for_t5_pretraining_lengths():
    # T5 feeds 568 raw tokens to get 512 inputs and 114 targets (with EOS) at density 0.15, mean span 3
    n_noise, n_spans = noise_counts(568)
    assert (n_noise, n_spans) == (85, 28)
    assert 568 - n_noise + n_spans + 1 == 512 and n_noise + n_spans + 1 == 114


def test_noise_is_spread_over_the_row():
    rng = np.random.default_rng(1)
    masks = np.stack([random_spans_noise_mask(40, rng) for _ in range(400)])
    frequency = masks.mean(axis=0)
    # as published (without random_roll) the row opens with a non-noise run and closes with a noise span
    assert frequency[0] == 0.0 and frequency[-1] == 1.0
    assert (frequency[1:-6] > 0.03).all() and (frequency[1:-6] < 0.2).all()
    spans = [length for m in masks for _, length in _runs(m)]
    assert abs(np.mean(spans) - 6 / 2) < 1e-9  # 6 noise tokens in 2 spans every time: mean exactly 3


def test_sentinels_and_reconstruction():
    rng = np.random.default_rng(2)
    tokens = np.arange(10, 10 + 50)
    mask = random_spans_noise_mask(50, rng)
    n_noise, n_spans = noise_counts(50)
    inputs, targets = span_corrupt(tokens, mask, first_sentinel_id=99, eos_id=1)
    assert len(inputs) == 50 - n_noise + n_spans + 1 and len(targets) == n_noise + n_spans + 1
    assert inputs[-1] == 1 and targets[-1] == 1
    sentinels = list(range(99, 99 - n_spans, -1))  # <extra_id_0> = 99, <extra_id_1> = 98, ...
    assert [t for t in inputs if t > 90] == sentinels
    assert [t for t in targets if t > 90] == sentinels
    assert targets[0] == 99  # the targets open with <extra_id_0>
    # the spans the targets hold, keyed by sentinel, put back into the inputs give the original row
    spans, current = {}, None
    for t in targets[:-1]:
        if t > 90:
            current = spans.setdefault(int(t), [])
        else:
            current.append(int(t))
    rebuilt = [x for t in inputs[:-1] for x in (spans[int(t)] if t > 90 else [int(t)])]
    assert rebuilt == tokens.tolist()
    assert [tokens[i] for i in np.flatnonzero(mask)] == [x for s in sentinels for x in spans[s]]


class _Vocab:
    def __init__(self, ids: dict[str, int]) -> None:
        self.ids = ids

    def token_to_id(self, token: str) -> int | None:
        return self.ids.get(token)


def test_sentinel_ids_come_from_the_tokenizer():
    # T5's vocabulary: <extra_id_0> is the last id, <extra_id_k> counts down
    t5_like = _Vocab({f"<extra_id_{k}>": 32099 - k for k in range(100)})
    assert first_sentinel_id(t5_like, 100) == 32099
    with pytest.raises(ValueError, match="<extra_id_0>"):
        first_sentinel_id(_Vocab({}), 3)
    with pytest.raises(ValueError, match="<extra_id_2> has id 7"):
        first_sentinel_id(_Vocab({"<extra_id_0>": 10, "<extra_id_1>": 9, "<extra_id_2>": 7}), 3)


class _Rows:
    """A loader of fixed rows with a position, as PackedLoader has."""

    def __init__(self) -> None:
        self.i = 0

    def __next__(self):
        self.i += 1
        return {"input_ids": torch.arange(self.i, self.i + 60).view(3, 20) % 40 + 2}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def test_batches_are_reproducible_from_their_state():
    batches = SpanCorruptionBatches(_Rows(), first_sentinel_id=63, eos_id=1, seed=3)
    next(batches)
    state = batches.state_dict()
    first = next(batches)
    assert first["input_ids"].shape == (3, 20 - 3 + 1 + 1) and first["labels"].shape == (3, 3 + 1 + 1)
    assert torch.equal(first["decoder_input_ids"][:, 1:], first["labels"][:, :-1])
    assert (first["decoder_input_ids"][:, 0] == 0).all()
    other = next(batches)
    assert not torch.equal(other["input_ids"], first["input_ids"])
    batches.load_state_dict(state)
    again = next(batches)
    assert all(torch.equal(again[k], first[k]) for k in first)
    with pytest.raises(ValueError, match="first_sentinel_id"):
        next(SpanCorruptionBatches(_Rows(), first_sentinel_id=30, eos_id=1))


def test_t5_trains_on_span_corruption_through_the_trainer(tmp_path: Path, shards: Path):
    cfg = tiny_config(tmp_path / "run", shards, max_steps=20, **{"optim.lr": 1e-2, "checkpoint.export": True})
    torch.manual_seed(0)
    model = T5Model(
        T5Config(
            vocab_size=VOCAB,
            d_model=32,
            head_dim=8,
            d_ff=64,
            n_layers=2,
            n_heads=4,
            relative_buckets=8,
            relative_max_distance=16,
            max_seq_len=64,
            eos_token_id=13,
            feed_forward_proj="gated-gelu",
            tie_embeddings=False,
        )
    )
    loader = PackedLoader.from_config(cfg.data, cfg.batch.micro_batch_size)
    data = SpanCorruptionBatches(loader, first_sentinel_id=VOCAB - 1, eos_id=13, seed=cfg.seed)
    result = Trainer(cfg, model=model, objective=Seq2SeqObjective(), train_data=data).fit()
    losses = [r["loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 20
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses
    # the run exports a transformers T5 folder holding the trained weights
    exported = load_pretrained(result.model_dir)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(result.model_dir).eval()
    batch = next(data)
    with torch.no_grad():
        want = hf(input_ids=batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"]).logits
        assert (exported(batch["input_ids"], batch["decoder_input_ids"]).logits - want).abs().max() < 1e-4
        assert (model.eval()(batch["input_ids"], batch["decoder_input_ids"]).logits - want).abs().max() < 1e-4


class _Crash(Exception):
    pass


def _t5_run(run: Path, shards: Path, hook=None):
    cfg = tiny_config(run, shards, max_steps=8, **{"checkpoint.every_steps": 3})
    torch.manual_seed(0)
    model = T5Model(
        T5Config(
            vocab_size=VOCAB,
            d_model=32,
            head_dim=8,
            d_ff=64,
            n_layers=2,
            n_heads=4,
            max_seq_len=64,
            eos_token_id=13,
            dropout=0.1,  # dropout: the RNG state must resume too
        )
    )
    loader = PackedLoader.from_config(cfg.data, cfg.batch.micro_batch_size)
    data = SpanCorruptionBatches(loader, first_sentinel_id=VOCAB - 1, eos_id=13, seed=cfg.seed)
    return Trainer(cfg, model=model, objective=Seq2SeqObjective(), train_data=data, batch_hook=hook).fit()


def test_a_crashed_t5_run_resumes_exactly(tmp_path: Path, shards: Path):
    def crash_at_step_5(step: int, batch):
        if step == 5:
            raise _Crash
        return batch

    _t5_run(tmp_path / "straight", shards)
    with pytest.raises(_Crash):
        _t5_run(tmp_path / "crashed", shards, crash_at_step_5)
    assert _t5_run(tmp_path / "crashed", shards).step == 8

    def losses(run: Path) -> list[float]:
        return [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]

    assert losses(tmp_path / "crashed") == losses(tmp_path / "straight")  # bitwise: fp32 on CPU


def test_unsupported_parallelism_is_refused_for_t5(tmp_path: Path, shards: Path):
    from lmforge.config import ConfigError

    cfg = tiny_config(tmp_path / "run", shards, **{"precision.activation_checkpointing": True})
    model = T5Model(
        T5Config(vocab_size=VOCAB, d_model=16, head_dim=4, d_ff=32, n_layers=1, n_heads=4, max_seq_len=64)
    )
    with pytest.raises(ConfigError, match=r"precision\.activation_checkpointing"):
        Trainer(
            cfg, model=model, objective=Seq2SeqObjective(), train_data=iter([]), val_data=lambda: iter([])
        )
