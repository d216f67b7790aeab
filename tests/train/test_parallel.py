"""Data, fully sharded, tensor and pipeline parallel training on CPU (gloo) match the single-process run.

Each torchrun launch trains the tiny model under several layouts in turn (tests/train/dist_worker.py);
every layout sees the same global batch of 4 sequences per step as the single-process reference.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.model import Transformer, load_pretrained
from lmforge.train import train
from lmforge.train.metrics import read_jsonl
from lmforge.train.parallel import stage_layers
from tests.train.conftest import tiny_config
from tests.train.dist_worker import SHARED, STEPS

REPO = Path(__file__).resolve().parents[2]
TWO_RANK_MODES = ["ddp", "ddp_accum", "fsdp_zero2", "fsdp_zero3", "tp", "pp_gpipe", "pp_1f1b"]
FOUR_RANK_MODES = ["fsdp_tp", "fsdp_pp"]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def torchrun(nproc: int, shards: Path, out: Path, modes: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    cmd += ["--standalone", "-m", "tests.train.dist_worker", str(shards), str(out), *modes]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def reference(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    train(tiny_config(run, shards, max_steps=STEPS + 2, **SHARED))
    return run


@pytest.fixture(scope="module")
def reference_at_steps(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Transformer:
    """The single-process model after STEPS steps, as exported."""
    run = tmp_path_factory.mktemp("reference-short") / "run"
    return load_pretrained(train(tiny_config(run, shards, max_steps=STEPS, **SHARED)).model_dir)


@pytest.fixture(scope="module")
def two_ranks(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("two-ranks")
    torchrun(2, shards, out, TWO_RANK_MODES)
    return out


@pytest.fixture(scope="module")
def four_ranks(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("four-ranks")
    torchrun(4, shards, out, FOUR_RANK_MODES)
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", TWO_RANK_MODES)
def test_two_rank_layouts_match_single_process(
    mode: str, two_ranks: Path, reference: Path, reference_at_steps: Transformer
) -> None:
    expected = losses(reference)[:STEPS]
    got = losses(two_ranks / mode)
    assert len(got) == STEPS
    assert got == pytest.approx(expected, rel=2e-5)
    assert expected[-1] < expected[0]  # the steps did train
    # the model exported at the end (gathered from shards / stages) is the single-process model
    exported = load_pretrained(two_ranks / mode / "model")
    for (name, a), b in zip(exported.state_dict().items(), reference_at_steps.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", FOUR_RANK_MODES)
def test_composed_meshes_match_single_process(mode: str, four_ranks: Path, reference: Path) -> None:
    assert losses(four_ranks / mode) == pytest.approx(losses(reference)[:STEPS], rel=2e-5)


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["fsdp_zero3", "tp", "pp_1f1b"])
def test_sharded_checkpoint_resumes_on_one_rank(
    mode: str, two_ranks: Path, reference: Path, shards: Path
) -> None:
    """A checkpoint written by 2 ranks (sharded weights and optimizer state) continues in 1 process."""
    run = two_ranks / mode
    result = train(tiny_config(run, shards, max_steps=STEPS + 2, **SHARED))
    assert result.step == STEPS + 2
    assert losses(run) == pytest.approx(losses(reference), rel=5e-5)
    resumed, uninterrupted = load_pretrained(run / "model"), load_pretrained(reference / "model")
    for (name, a), b in zip(resumed.state_dict().items(), uninterrupted.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_stage_layers_cover_the_model_once() -> None:
    for n_layers, pp in [(2, 2), (5, 2), (7, 3), (4, 4)]:
        stages = [list(stage_layers(n_layers, pp, s)) for s in range(pp)]
        assert [layer for stage in stages for layer in stage] == list(range(n_layers))
        assert max(map(len, stages)) - min(map(len, stages)) <= 1
    with pytest.raises(ValueError):
        stage_layers(1, 2, 0)


def test_split_pipeline_stage_keeps_parameter_names() -> None:
    from lmforge.model import ModelConfig
    from lmforge.train.parallel import split_pipeline_stage

    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=3, n_heads=2, d_ff=32)
    full = {name for name, _ in Transformer(cfg).named_parameters()}
    first = split_pipeline_stage(Transformer(cfg), 2, 0)
    last = split_pipeline_stage(Transformer(cfg), 2, 1)
    names0 = {n for n, _ in first.named_parameters()}
    names1 = {n for n, _ in last.named_parameters()}
    assert names0 | names1 == full and not names0 & names1
    assert list(first.blocks) == ["0", "1"] and list(last.blocks) == ["2"]
    assert first.lm_head is None and last.embed_tokens is None


@pytest.mark.parametrize(
    "overrides",
    [
        {"tie_embeddings": True},
        {
            "norm": "deepnorm",
            "norm_position": "post",
            "position": "learned",
            "qkv_bias": True,
            "mlp_bias": True,
        },
        {"n_experts": 4, "moe_top_k": 2},
        {"layer_types": ["mamba", "attention", "mamba"]},
    ],
)
def test_a_meta_built_model_materialises_with_the_plain_build_weights(overrides: dict) -> None:
    from lmforge.model import ModelConfig
    from lmforge.train.parallel import materialize

    cfg = ModelConfig(vocab_size=40, d_model=16, n_layers=3, n_heads=2, d_ff=32, max_seq_len=16, **overrides)
    torch.manual_seed(7)
    plain = Transformer(cfg)
    after_plain = torch.rand(3)  # the generator moves on exactly as after a plain build
    with torch.device("meta"):
        lazy = Transformer(cfg)
    materialize(lazy, torch.device("cpu"), seed=7)
    assert torch.equal(torch.rand(3), after_plain)
    for (name, a), (_, b) in zip(plain.named_parameters(), lazy.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    if cfg.tie_embeddings:
        assert lazy.lm_head.weight is lazy.embed_tokens.weight


def test_a_pipeline_stage_materialises_only_its_blocks_with_their_plain_weights() -> None:
    from lmforge.model import ModelConfig
    from lmforge.train.parallel import materialize, split_pipeline_stage

    cfg = ModelConfig(vocab_size=40, d_model=16, n_layers=3, n_heads=2, d_ff=32)
    torch.manual_seed(3)
    plain = dict(Transformer(cfg).named_parameters())
    with torch.device("meta"):
        stage = split_pipeline_stage(Transformer(cfg), 2, 1)
    materialize(stage, torch.device("cpu"), seed=3)
    names = [name for name, _ in stage.named_parameters()]
    assert names and all(name.startswith(("blocks.2.", "norm.", "lm_head.")) for name in names)
    for name, p in stage.named_parameters():
        assert not p.is_meta and torch.equal(p, plain[name]), name
