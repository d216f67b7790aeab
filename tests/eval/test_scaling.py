import json
import math
import random

import pytest

from lmforge.cli import main
from lmforge.config import save_config
from lmforge.eval.scaling import (
    CHINCHILLA,
    ChinchillaLaw,
    LadderConfig,
    PowerLaw,
    RungConfig,
    fit_chinchilla,
    fit_power_law,
    plan,
    predict_largest,
    read_run,
    rule_of_thumb,
    rung_config,
    shape_for_params,
)
from lmforge.model import ModelConfig
from lmforge.model.flops import count_parameters, memory_plan
from lmforge.shards.loader import DataConfig
from lmforge.train.config import TrainConfig

# Hoffmann et al. 2022, Table 3 (approach 1): parameters, FLOPs, tokens of compute-optimal models.
CHINCHILLA_TABLE_3 = [
    (400e6, 1.92e19, 8.0e9),
    (1e9, 1.21e20, 20.2e9),
    (10e9, 1.23e22, 205.1e9),
    (67e9, 5.76e23, 1.5e12),
    (175e9, 3.85e24, 3.7e12),
    (280e9, 9.90e24, 5.9e12),
    (520e9, 3.43e25, 11.0e12),
    (1e12, 1.27e26, 21.2e12),
    (10e12, 1.30e28, 216.2e12),
]


@pytest.mark.parametrize(("params", "flops", "tokens"), CHINCHILLA_TABLE_3)
def test_twenty_tokens_per_parameter_reproduces_chinchilla_table_3(params, flops, tokens):
    """Within 5% on parameters and 10% on tokens (the table's tokens/param drift from 20 to 22 at 67B)."""
    n, d = rule_of_thumb(flops)
    assert n == pytest.approx(params, rel=0.05)
    assert d == pytest.approx(tokens, rel=0.10)
    assert 6 * n * d == pytest.approx(flops)


def test_chinchilla_fit_allocation_exponents_and_optimum():
    # The paper's approach 3 gives N_opt ~ C^0.46 and D_opt ~ C^0.54 (Table 2).
    n1, d1 = CHINCHILLA.optimal(1e21)
    n2, d2 = CHINCHILLA.optimal(1e24)
    assert math.log10(n2 / n1) / 3 == pytest.approx(0.46, abs=0.01)
    assert math.log10(d2 / d1) / 3 == pytest.approx(0.54, abs=0.01)
    for flops in (1e20, 5.76e23, 1e26):
        n, d = CHINCHILLA.optimal(flops)
        assert 6 * n * d == pytest.approx(flops)
        best = CHINCHILLA(n, d)
        for factor in (0.8, 0.95, 1.05, 1.25):  # any other split of the same budget loses more
            assert CHINCHILLA(n * factor, flops / (6 * n * factor)) > best
        c_back, d_back = CHINCHILLA.optimal_for_params(n)
        assert c_back == pytest.approx(flops) and d_back == pytest.approx(d)


def test_power_law_fit_recovers_known_parameters_and_predicts_a_larger_run():
    law = PowerLaw(a=50.0, b=0.1, c=1.8)
    flops = [1e15 * 4**i for i in range(8)]
    rng = random.Random(0)
    losses = [law(c) * (1 + rng.uniform(-0.002, 0.002)) for c in flops]
    fit = fit_power_law(flops[:-1], losses[:-1])
    assert fit.b == pytest.approx(0.1, rel=0.15) and fit.c == pytest.approx(1.8, rel=0.05)
    assert fit(flops[-1]) == pytest.approx(law(flops[-1]), rel=0.005)
    exact = fit_power_law(flops, [law(c) for c in flops])
    assert (exact.a, exact.b, exact.c) == pytest.approx((50.0, 0.1, 1.8), rel=1e-3)
    with pytest.raises(ValueError, match="three"):
        fit_power_law(flops[:2], losses[:2])


def test_chinchilla_fit_recovers_known_parameters():
    true = ChinchillaLaw(E=1.8, A=400.0, B=600.0, alpha=0.33, beta=0.3)
    runs = [(n, d) for n in (1e6, 3e6, 1e7, 3e7, 1e8) for d in (1e8, 1e9, 1e10)]
    fit = fit_chinchilla([n for n, _ in runs], [d for _, d in runs], [true(n, d) for n, d in runs])
    assert (fit.E, fit.A, fit.B, fit.alpha, fit.beta) == pytest.approx(
        (1.8, 400.0, 600.0, 0.33, 0.3), rel=0.01
    )
    assert fit(1e9, 1e11) == pytest.approx(true(1e9, 1e11), rel=1e-3)


def _fake_run(folder, d_model, n_layers, tokens, loss_of):
    """A finished run folder: its config and a metrics.jsonl whose losses follow ``loss_of(N, D)``."""
    cfg = TrainConfig(
        run_dir=str(folder), model=ModelConfig(vocab_size=256, d_model=d_model, n_layers=n_layers, n_heads=2)
    )
    cfg.data.seq_len = 64
    folder.mkdir()
    save_config(cfg, folder / "config.yaml")
    count = count_parameters(cfg.model)
    n = count.active - count.embedding
    with (folder / "metrics.jsonl").open("w") as f:
        for step in range(1, 11):
            f.write(json.dumps({"step": step, "tokens": tokens * step // 10, "loss": 9.0, "lr": 1e-3}) + "\n")
        f.write(json.dumps({"step": 10, "val_loss": loss_of(n, tokens)}) + "\n")
    # Kaplan et al. 2020, Table 1: C = (6 N + 6 n_layer n_ctx d_attn) D, N non-embedding, no LM head
    return n, (6 * n + 6 * n_layers * 64 * d_model) * tokens


def test_scaling_fit_reads_runs_and_predicts_the_largest(tmp_path, capsys):
    true = ChinchillaLaw(E=2.0, A=80.0, B=300.0, alpha=0.3, beta=0.3)
    shapes = [(32, 1, 2e6), (32, 2, 4e6), (64, 2, 8e6), (64, 3, 1.6e7), (96, 3, 3.2e7), (128, 4, 6.4e7)]
    runs = []
    for i, (d_model, n_layers, tokens) in enumerate(shapes):
        folder = tmp_path / f"run{i}"
        n, c = _fake_run(folder, d_model, n_layers, int(tokens), true)
        point = read_run(folder)
        assert point.params == n and point.tokens == int(tokens) and point.flops == pytest.approx(c)
        assert point.loss == true(n, int(tokens))  # the validation loss, not the training losses
        runs.append(str(folder))
    report = predict_largest([read_run(r) for r in runs]).to_dict()
    assert report["target"]["run"] == runs[-1]
    assert abs(report["error_chinchilla"]) < 1e-3 * report["target"]["loss"]
    assert abs(report["error_power_law"]) < 0.05 * report["target"]["loss"]

    assert main(["scaling", "fit", *reversed(runs), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["target"]["run"] == runs[-1]
    assert printed["predicted_chinchilla"] == pytest.approx(report["predicted_chinchilla"], rel=1e-6)
    assert main(["scaling", "fit", *runs]) == 0
    assert "predicted" in capsys.readouterr().out


def test_plan_for_a_size_and_for_a_budget(capsys):
    assert main(["plan", "--params", "1e9", "--seq-len", "1024", "--zero", "1", "--dp", "4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rows] == ["chinchilla", "20 tokens/param"]
    assert rows[1]["tokens"] == pytest.approx(2e10) and rows[1]["flops"] == pytest.approx(1.2e20)
    assert rows[0]["flops"] == pytest.approx(CHINCHILLA.optimal_for_params(1e9)[0])
    cfg = shape_for_params(1e9, 32000, 1024)
    assert rows[0]["model_non_embedding_params"] == pytest.approx(1e9, rel=0.1)
    expected = memory_plan(cfg, micro_batch=1, context=1024, dp=4, zero_stage=1).as_gib()
    assert rows[0]["memory_gib"] == pytest.approx(expected)

    assert main(["plan", "--flops", "5.76e23"]) == 0
    out = capsys.readouterr().out
    assert "20 tokens/param: N 6.93e+10" in out and "memory per GPU" in out
    with pytest.raises(ValueError, match="exactly one"):
        plan()


def test_ladder_trains_four_sizes_through_the_trainer_and_predicts_the_largest(tmp_path, capsys):
    from tests.train.conftest import make_shards, tiny_data

    shards = make_shards(tmp_path / "shards")
    recipe = {
        "train": tiny_data(tmp_path / "ladder", shards, **{"log.every_steps": 2}),
        "sizes": [
            {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32},
            {"d_model": 24, "n_layers": 2, "n_heads": 2, "d_ff": 48},
            {"d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64},
            {"d_model": 48, "n_layers": 3, "n_heads": 4, "d_ff": 96},
        ],
        "tokens_per_param": 0.1,
    }
    (tmp_path / "ladder.yaml").write_text(json.dumps(recipe))  # JSON is YAML
    assert main(["scaling", "ladder", "--config", str(tmp_path / "ladder.yaml")]) == 0
    report = json.loads((tmp_path / "ladder" / "ladder.json").read_text())
    points = report["points"]
    assert [p["run"] for p in points] == [str(tmp_path / "ladder" / f"rung-{i}") for i in range(4)]
    tokens_per_step = 4 * 16
    for i, point in enumerate(points):
        assert point == pytest.approx(read_run(tmp_path / "ladder" / f"rung-{i}").__dict__)
        steps = max(1, round(0.1 * point["params"] / tokens_per_step))
        assert point["tokens"] == steps * tokens_per_step  # the rung trained for its token budget
    assert [p["params"] for p in points] == sorted(p["params"] for p in points)
    law = PowerLaw(**report["power_law"])
    assert report["predicted_power_law"] == pytest.approx(law(points[-1]["flops"]))
    assert report["error_power_law"] == pytest.approx(report["predicted_power_law"] - points[-1]["loss"])
    assert report["chinchilla"] is None  # five parameters need at least five fitted runs
    assert "largest rung" in capsys.readouterr().out


def test_compute_is_kaplans_non_embedding_count_without_the_lm_head(tmp_path):
    # d_model 64, 2 layers, vocab 256, context 64: by hand, N = 2 * (4 * 64^2 + 3 * 64 * d_ff) + norms
    n, _ = _fake_run(tmp_path / "run", 64, 2, 1000, lambda n, d: 3.0)
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=2)
    assert n == 2 * (4 * 64 * 64 + 3 * 64 * cfg.d_ff + 2 * 64) + 64
    point = read_run(tmp_path / "run")
    # 6 N D for the weights + 6 * n_layer * n_ctx * d_attn * D for QK^T and AV; a vocabulary 256 LM head
    # (6 * 256 * 64 * D more) is not counted
    assert point.flops == 6 * n * 1000 + 6 * 2 * 64 * 64 * 1000
    assert point.flops / (6 * point.params * point.tokens) == pytest.approx(1 + 64 * 64 * 2 / n)


def test_read_run_prefers_the_final_held_out_loss_then_the_training_tail(tmp_path):
    cfg = TrainConfig(
        run_dir=str(tmp_path), model=ModelConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=2)
    )
    cfg.data.seq_len = 64

    def run(name, records):
        folder = tmp_path / name
        folder.mkdir()
        save_config(cfg, folder / "config.yaml")
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return read_run(folder).loss

    train = [{"step": s, "tokens": 100 * s, "loss": 10.0 - s} for s in range(1, 9)]
    # the validation loss of the last step wins over an earlier, lower one logged later in the file
    final = [*train[:4], {**train[3], "val_loss": 2.5}, *train[4:], {"step": 8, "val_loss": 4.0}]
    assert run("final", final) == 4.0
    assert run("earlier", [*train[:4], {"step": 4, "val_loss": 6.5}, *train[4:]]) == 6.5
    # no validation at all: the mean of the last five logged training losses, (6 + 5 + 4 + 3 + 2) / 5
    assert run("tail", train) == 4.0


def test_power_law_fit_stays_decreasing_with_an_offset_below_every_loss():
    # four points whose last one is higher than the third (noise at the largest size): unconstrained, the
    # least-squares fit put c at 4.0, above the 3.9 already reached; the constrained one keeps c <= min(L)
    flops = [1e12, 4e12, 1.6e13, 6.4e13]
    losses = [5.0, 4.2, 3.9, 4.1]
    law = fit_power_law(flops, losses)
    assert law.b > 0 and 0 < law.c <= min(losses) and law.a > 0
    assert law(2.56e14) < law(6.4e13) < law(1e12)
    assert law(2.56e14) < 3.95  # the unconstrained law predicted 4.0, above the 3.9 already reached
    # and on clean data it still recovers the law exactly, a sub-1% offset included
    true = PowerLaw(a=20.0, b=0.15, c=0.02)
    grid = [1e10 * 3**i for i in range(5)]
    fit = fit_power_law(grid, [true(c) for c in grid])
    assert (fit.a, fit.b, fit.c) == pytest.approx((20.0, 0.15, 0.02), rel=1e-3)


def test_rung_config_minimum_steps_own_schedule_and_final_validation(tmp_path):
    base = TrainConfig(
        run_dir=str(tmp_path),
        model=ModelConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=2, max_seq_len=16),
        data=DataConfig(seq_len=16),
    )
    base.batch.micro_batch_size = 4
    sizes = [
        RungConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32),
        RungConfig(d_model=64, n_layers=2, n_heads=4),
    ]
    ladder = LadderConfig(train=base, sizes=sizes, tokens_per_param=1.0, min_steps=50)
    small, large = rung_config(ladder, 0), rung_config(ladder, 1)
    # rung 0: N = 4 * 16^2 + 3 * 16 * 32 + 2 * 16 + 16 = 2608 -> 2608 / 64 tokens per step = 41 steps < 50
    assert small.max_steps == 50
    count = count_parameters(large.model)
    assert large.max_steps == round((count.active - count.embedding) / 64) > 50
    assert small.run_dir == str(tmp_path / "rung-0")
    assert small.log.val_every_steps == 0  # no held-out data: nothing to validate on
    base.data.val_fraction = 0.1
    base.log.val_every_steps = 25
    small, large = rung_config(ladder, 0), rung_config(ladder, 1)
    assert small.log.val_every_steps == 25  # divides 50: the last step is validated anyway
    assert large.log.val_every_steps == large.max_steps  # else validated at its own last step
    assert small.schedule == base.schedule and small.max_steps != large.max_steps  # warmup/cosine per rung
    with pytest.raises(ValueError, match="min_steps"):
        LadderConfig(train=base, sizes=sizes, min_steps=-1)
