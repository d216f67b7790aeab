"""The training loop: convergence, per-token accumulation, spike rollback, non-finite handling, resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import load_config, to_dict
from lmforge.model import load_pretrained
from lmforge.shards.loader import PackedLoader
from lmforge.train import LMObjective, Trainer, TrainingError, train
from lmforge.train.checkpoint import NonFiniteCheckpointError, list_checkpoints
from lmforge.train.config import TrainConfig
from lmforge.train.metrics import read_jsonl
from lmforge.train.objective import IGNORE_INDEX
from tests.train.conftest import tiny_config

SPIKE_STEP = 18
SPIKY = {"optim.lr": 1e-2, "checkpoint.every_steps": 4, "stability.window": 8, "stability.min_history": 6}


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def events(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "events.jsonl")


class Recorder:
    """A batch hook that records what each step trained on and can corrupt chosen steps' labels once."""

    def __init__(self, corrupt_steps: tuple[int, ...] = ()) -> None:
        self.seen: list[tuple[int, list[int]]] = []
        self.corrupt = set(corrupt_steps)

    def __call__(self, step: int, batch: dict) -> dict:
        self.seen.append((step, batch["input_ids"][0, :4].tolist()))
        if step in self.corrupt:
            self.corrupt.discard(step)
            batch = {**batch, "labels": torch.full_like(batch["labels"], 50)}  # a token the data never has
        return batch


def test_loss_falls_and_the_run_folder_is_complete(tmp_path: Path, shards: Path) -> None:
    cfg = tiny_config(
        tmp_path / "run",
        shards,
        max_steps=30,
        **{
            "optim.lr": 1e-2,
            "checkpoint.every_steps": 10,
            "checkpoint.export": True,
            "log.plots": True,
            "log.every_steps": 5,
            "log.val_every_steps": 15,
            "data.val_fraction": 0.2,
        },
    )
    result = train(cfg)
    run = result.run_dir
    history = losses(run)
    assert result.step == 30 and len(history) == 6
    assert history[-1] < 0.5 * history[0]
    assert {"config.yaml", "versions.json", "metrics.jsonl"} <= {p.name for p in run.iterdir()}
    assert sorted(p.name for p in (run / "plots").glob("*.png")) == ["loss.png", "lr.png", "throughput.png"]
    record = result.metrics
    assert record["tokens"] == 30 * 4 * 16 and record["tokens_per_s"] > 0 and 0 < record["lr"] < 1e-2
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == [
        "step_00000010",
        "step_00000020",
        "step_00000030",
    ]

    # validation loss = the exported model's mean cross-entropy over the held-out batches
    model = load_pretrained(result.model_dir)
    val = PackedLoader.from_config(cfg.data, batch_size=4, split="val")
    total, count = 0.0, 0
    with torch.no_grad():
        for _, batch in zip(range(cfg.log.val_batches), val):
            logits = model(batch["input_ids"]).logits
            total += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), reduction="sum"
            )
            count += batch["labels"].numel()
    assert result.val_loss == pytest.approx(float(total) / count, rel=1e-5)
    assert read_jsonl(run / "metrics.jsonl")[-1]["val_ppl"] == pytest.approx(math.exp(result.val_loss))


def mask_some_labels(step: int, batch: dict) -> dict:
    """Uneven label counts per sequence, so per-micro-batch averaging would differ from per-token."""
    labels = batch["labels"].clone()
    labels[batch["input_ids"] % 3 == 0] = IGNORE_INDEX
    labels[0, : 3 + step] = IGNORE_INDEX
    return {**batch, "labels": labels}


@pytest.mark.parametrize("layout", [{"batch.grad_accum_steps": 2}, {"batch.grad_accum_steps": 4}])
def test_accumulated_micro_batches_equal_one_big_batch(tmp_path: Path, shards: Path, layout: dict) -> None:
    accum = layout["batch.grad_accum_steps"]
    common = {"max_steps": 3, "stability.spike_detection": False}
    big = Trainer(tiny_config(tmp_path / "big", shards, **common, **{"batch.micro_batch_size": 8}))
    small_cfg = tiny_config(
        tmp_path / "small", shards, **common, **layout, **{"batch.micro_batch_size": 8 // accum}
    )
    small = Trainer(small_cfg, batch_hook=mask_some_labels)
    big.batch_hook = lambda step, batch: torch_cat_then_mask(step, batch, accum)
    big.fit(), small.fit()
    assert losses(tmp_path / "big") == pytest.approx(losses(tmp_path / "small"), rel=1e-6)
    for a, b in zip(big.model.parameters(), small.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # Adam amplifies rounding of ~0 grads


def torch_cat_then_mask(step: int, batch: dict, pieces: int) -> dict:
    """Mask the big batch exactly as the micro-batches are masked one by one."""
    chunks = [
        mask_some_labels(step, {k: v.chunk(pieces)[i] for k, v in batch.items()}) for i in range(pieces)
    ]
    return {k: torch.cat([c[k] for c in chunks]) for k in batch}


def test_batch_ramp_accumulates_more_micro_batches_as_tokens_grow(tmp_path: Path, shards: Path) -> None:
    ramp = {"batch.grad_accum_steps": 4, "batch.ramp_start_tokens": 64, "batch.ramp_tokens": 512}
    train(tiny_config(tmp_path / "run", shards, max_steps=8, **ramp))
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    accums = [r["accum"] for r in records]
    assert accums[0] == 1 and accums[-1] == 4 and accums == sorted(accums)
    tokens = 0
    for r in records:  # each step's batch follows the linear ramp of the tokens seen before it
        expected = 4 if tokens >= 512 else max(1, min(4, round((64 + (256 - 64) * tokens / 512) / 64)))
        assert r["accum"] == expected
        tokens += r["batch_tokens"]
        assert r["tokens"] == tokens


def test_loss_spike_rolls_back_and_skips_the_data_window(tmp_path: Path, shards: Path) -> None:
    clean = Recorder()
    train(tiny_config(tmp_path / "clean", shards, max_steps=24, **SPIKY), batch_hook=clean)
    spiky = Recorder(corrupt_steps=(SPIKE_STEP,))
    result = train(tiny_config(tmp_path / "spiky", shards, max_steps=24, **SPIKY), batch_hook=spiky)

    assert result.step == 24 and result.rollbacks == 1
    [event] = events(tmp_path / "spiky")
    assert event["event"] == "loss_spike" and event["action"] == "rollback" and event["z"] > 6
    assert event["step"] == SPIKE_STEP and event["to_step"] == 16 and event["skipped_steps"] == 3
    # back at step 16, training resumed on the batch after the spike: batches 16..18 are never reused
    assert spiky.seen[: SPIKE_STEP + 1] == clean.seen[: SPIKE_STEP + 1]
    assert spiky.seen[SPIKE_STEP + 1] == (16, clean.seen[SPIKE_STEP + 1][1])
    steps = [r["step"] for r in read_jsonl(tmp_path / "spiky" / "metrics.jsonl")]
    assert steps == list(range(1, 25))  # the undone steps' records were replaced
    assert max(losses(tmp_path / "spiky")) < 4.5


def test_rollback_cap_stops_the_run(tmp_path: Path, shards: Path) -> None:
    cfg = tiny_config(tmp_path / "run", shards, max_steps=24, **SPIKY, **{"stability.max_rollbacks": 0})
    with pytest.raises(TrainingError, match="rollbacks"):
        train(cfg, batch_hook=Recorder(corrupt_steps=(SPIKE_STEP,)))
    assert events(tmp_path / "run")[-1]["action"] == "stop"


def test_rollbacks_are_counted_within_a_window_of_steps(tmp_path: Path, shards: Path) -> None:
    # two one-batch spikes 8 steps apart, at most one rollback per 5 steps: the run goes on
    cap = {"stability.max_rollbacks": 1, "stability.rollback_window": 5}
    cfg = tiny_config(tmp_path / "run", shards, max_steps=24, **SPIKY, **cap)
    result = train(cfg, batch_hook=Recorder(corrupt_steps=(14, 22)))
    assert result.step == 24 and result.rollbacks == 2
    assert [e["action"] for e in events(tmp_path / "run")] == ["rollback", "rollback"]
    # within one window of 20 steps they are one rollback too many
    cfg = tiny_config(
        tmp_path / "capped", shards, max_steps=24, **SPIKY, **{**cap, "stability.rollback_window": 20}
    )
    with pytest.raises(TrainingError, match="rollback_window"):
        train(cfg, batch_hook=Recorder(corrupt_steps=(14, 22)))


def test_skip_batches_skips_more_data_after_the_spike(tmp_path: Path, shards: Path) -> None:
    clean = Recorder()
    train(tiny_config(tmp_path / "clean", shards, max_steps=24, **SPIKY), batch_hook=clean)
    spiky = Recorder(corrupt_steps=(SPIKE_STEP,))
    skip = {"stability.skip_batches": 2}
    result = train(tiny_config(tmp_path / "spiky", shards, max_steps=24, **SPIKY, **skip), batch_hook=spiky)
    assert result.step == 24
    [event] = events(tmp_path / "spiky")
    assert event["to_step"] == 16 and event["skipped_batches"] == 2
    # back at step 16, training resumed 2 batches after the one of the spike
    assert spiky.seen[SPIKE_STEP + 1] == (16, clean.seen[SPIKE_STEP + 3][1])


class Poison:
    """A batch hook that corrupts one particular batch every time it comes (bad data, not bad luck)."""

    def __init__(self, bad: torch.Tensor) -> None:
        self.bad = bad

    def __call__(self, step: int, batch: dict) -> dict:
        if torch.equal(batch["input_ids"], self.bad):
            batch = {**batch, "labels": torch.full_like(batch["labels"], 50)}
        return batch


def test_a_relaunch_after_the_rollback_cap_skips_the_data_that_spiked(tmp_path: Path, shards: Path) -> None:
    batches: list[torch.Tensor] = []
    train(
        tiny_config(tmp_path / "clean", shards, max_steps=24, **SPIKY),
        batch_hook=lambda step, batch: batches.append(batch["input_ids"]) or batch,
    )
    poison = Poison(batches[SPIKE_STEP])
    cfg = tiny_config(tmp_path / "run", shards, max_steps=24, **SPIKY, **{"stability.max_rollbacks": 0})
    with pytest.raises(TrainingError):
        train(cfg, batch_hook=poison)
    # the same data would spike at the same step again; the run logged it as skipped, so it goes on
    result = train(cfg, batch_hook=poison)
    assert result.step == 24 and result.rollbacks == 1
    assert [e["action"] for e in events(tmp_path / "run")] == ["stop"]
    assert max(losses(tmp_path / "run")) < 4.5


class NaNOnce(LMObjective):
    """The LM objective, but the loss of one forward is NaN (as an overflow would make it)."""

    def __init__(self, bad_call: int) -> None:
        self.calls, self.bad_call = 0, bad_call

    def __call__(self, model, batch):
        out = super().__call__(model, batch)
        self.calls += 1
        if self.calls == self.bad_call:
            out.loss_sum = out.loss_sum * float("nan")
        return out


@pytest.mark.parametrize("action", ["skip", "rollback"])
def test_non_finite_loss_is_never_applied(tmp_path: Path, shards: Path, action: str) -> None:
    overrides = {"stability.nonfinite": action, "checkpoint.every_steps": 3}
    trainer = Trainer(tiny_config(tmp_path / "run", shards, max_steps=8, **overrides), objective=NaNOnce(5))
    result = trainer.fit()
    [event] = events(tmp_path / "run")
    assert event["event"] == ("nonfinite_skip" if action == "skip" else "nonfinite")
    assert event["step"] == 4
    if action == "rollback":
        assert event["to_step"] == 3
    assert result.step == 8 and all(math.isfinite(x) for x in losses(tmp_path / "run"))
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_fp16_overflow_skips_the_update_and_lowers_the_loss_scale(tmp_path: Path, shards: Path) -> None:
    cfg = tiny_config(tmp_path / "run", shards, max_steps=6, **{"precision.dtype": "fp16"})
    trainer = Trainer(cfg, objective=NaNOnce(3))
    start_scale = trainer.scaler.get_scale()
    result = trainer.fit()
    [event] = events(tmp_path / "run")
    assert event["event"] == "overflow_skip" and event["step"] == 2 and event["scale"] == start_scale / 2
    assert result.step == 6 and all(math.isfinite(x) for x in losses(tmp_path / "run"))
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_a_nan_model_is_not_checkpointed(tmp_path: Path, shards: Path) -> None:
    trainer = Trainer(tiny_config(tmp_path / "run", shards))
    with torch.no_grad():
        trainer.model.lm_head.weight[3, 3] = float("inf")
    with pytest.raises(NonFiniteCheckpointError):
        trainer.save()
    assert list_checkpoints(tmp_path / "run" / "checkpoints") == []


class Crash(Exception):
    pass


def test_crash_then_resume_repeats_the_exact_loss_sequence(tmp_path: Path, shards: Path) -> None:
    overrides = {"checkpoint.every_steps": 3, "model.dropout": 0.1}  # dropout: RNG state must resume too
    train(tiny_config(tmp_path / "straight", shards, max_steps=10, **overrides))

    def crash_at_step_7(step: int, batch: dict) -> dict:
        if step == 7:
            raise Crash
        return batch

    run = tmp_path / "crashed"
    with pytest.raises(Crash):
        train(tiny_config(run, shards, max_steps=10, **overrides), batch_hook=crash_at_step_7)
    # and the newest checkpoint was damaged afterwards: resume falls back to step 3
    shard = next((run / "checkpoints" / "step_00000006" / "dcp").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    result = train(tiny_config(run, shards, max_steps=10, **overrides))
    assert result.step == 10
    assert losses(run) == losses(tmp_path / "straight")  # bitwise: fp32 on CPU
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, 11))
    again = train(tiny_config(run, shards, max_steps=10, **overrides))  # finished: nothing left to do
    assert again.step == 10 and again.metrics == result.metrics
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, 11))


@pytest.mark.parametrize(
    ("overrides", "rel"),
    [
        ({"precision.activation_checkpointing": True}, 1e-6),
        ({"precision.dtype": "bf16"}, 3e-2),
        ({"optim.name": "adafactor"}, None),
    ],
)
def test_precision_and_optimizer_variants_train(tmp_path: Path, shards: Path, overrides: dict, rel) -> None:
    reference = losses(train(tiny_config(tmp_path / "ref", shards, max_steps=6)).run_dir)
    variant = losses(train(tiny_config(tmp_path / "variant", shards, max_steps=6, **overrides)).run_dir)
    assert all(math.isfinite(x) for x in variant)
    if rel is not None:
        assert variant == pytest.approx(reference, rel=rel)
    else:
        assert variant[-1] < variant[0]


def test_init_from_a_model_folder_starts_from_its_weights(tmp_path: Path, shards: Path) -> None:
    first = train(tiny_config(tmp_path / "first", shards, max_steps=8, **{"checkpoint.export": True}))
    cfg = tiny_config(tmp_path / "second", shards, max_steps=1, init_from=str(first.model_dir))
    second = train(cfg)
    model = load_pretrained(first.model_dir)
    batch = next(PackedLoader.from_config(cfg.data, batch_size=4))
    with torch.no_grad():
        logits = model(batch["input_ids"]).logits
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))
    assert second.metrics["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert second.metrics["loss"] < losses(first.run_dir)[0] - 0.3  # not a fresh random model


def test_token_accounting_follows_a_curriculum_that_changes_the_sequence_length(
    tmp_path: Path, shards: Path
) -> None:
    # stage 1: 4 steps of 4 x 16 tokens; stage 2: sequences of 32 tokens until the end
    stages = [{"name": "short", "tokens": 4 * 4 * 16, "seq_len": 16}, {"name": "long", "seq_len": 32}]
    cfg = tiny_config(tmp_path / "run", shards, max_steps=8, **{"data.curriculum": stages})
    train(cfg)
    records = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["batch_tokens"] for r in records] == [64] * 4 + [128] * 4
    assert records[-1]["tokens"] == 4 * 64 + 4 * 128


def test_the_callers_config_is_not_changed_by_a_run(tmp_path, shards) -> None:
    import copy

    from lmforge.model import ModelConfig, Transformer

    cfg = tiny_config(tmp_path / "run", shards, max_steps=2)
    before = copy.deepcopy(cfg)
    other = ModelConfig(**{**to_dict(cfg.model), "n_layers": cfg.model.n_layers + 1})
    result = train(cfg, model=Transformer(other))
    assert cfg == before  # the model given is recorded in the run's config, not written into ours
    assert load_config(TrainConfig, result.run_dir / "config.yaml").model.n_layers == other.n_layers
