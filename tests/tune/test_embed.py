"""Contrastive embeddings: InfoNCE and MRR against hand computations, and a run through the trainer."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from lmforge.cli import main
from lmforge.config import load_config
from lmforge.model import ModelConfig, Transformer
from lmforge.model.hf import save_pretrained
from lmforge.tune.embed import (
    EmbedConfig,
    EmbeddingModel,
    collate_pairs,
    encode,
    info_nce_loss,
    load_embedding_model,
    mrr_at_k,
    pool,
    run_embed,
)

WORDS = ["tree", "apple", "hello", "world", "letters", "words", "answer", "banana", "blue", "add"]


def test_info_nce_matches_a_hand_computation() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # normalised: e1, e2
    d = torch.tensor([[3.0, 4.0], [0.0, -1.0]])  # normalised: (0.6, 0.8), (0, -1)
    s = torch.tensor(math.log(2.0))  # 1 / tau = 2
    cos = [[0.6, 0.0], [0.8, -1.0]]  # cos(q_i, d_j)

    def ce(row: list[float], right: int) -> float:
        return -2 * row[right] + math.log(sum(math.exp(2 * x) for x in row))

    forward = [ce(cos[0], 0), ce(cos[1], 1)]
    backward = [ce([cos[0][0], cos[1][0]], 0), ce([cos[0][1], cos[1][1]], 1)]
    assert info_nce_loss(q, d, s, symmetric=False).tolist() == pytest.approx(forward, abs=1e-6)
    both = [(a + b) / 2 for a, b in zip(forward, backward)]
    assert info_nce_loss(q, d, s).tolist() == pytest.approx(both, abs=1e-6)


def test_mrr_at_k_matches_a_hand_computation() -> None:
    docs = torch.eye(4)
    queries = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],  # its document first: 1
            [0.0, 0.5, 1.0, 0.0],  # doc 2 above doc 1: rank 2 -> 1/2
            [0.1, 0.2, 0.3, 0.9],  # doc 3 first, doc 2 second: rank 2 -> 1/2 ... wrong doc is 3
            [0.0, 0.0, 0.0, -1.0],  # every other doc (0) above -1: rank 4 -> 1/4
        ]
    )
    # query 2's own document is doc 2 (0.3), below doc 3 (0.9): rank 2
    assert mrr_at_k(queries, docs, k=10) == pytest.approx((1 + 1 / 2 + 1 / 2 + 1 / 4) / 4)
    assert mrr_at_k(queries, docs, k=3) == pytest.approx((1 + 1 / 2 + 1 / 2 + 0) / 4)


def test_mean_and_last_pooling_respect_lengths() -> None:
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    lengths = torch.tensor([2, 3])
    assert pool(hidden, lengths, "mean").tolist() == [[1.0, 2.0], [8.0, 9.0]]
    assert pool(hidden, lengths, "last").tolist() == [[2.0, 3.0], [10.0, 11.0]]


def pairs(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.sample(WORDS, 2)
        out.append(
            {"docstring": f"Return the {a} of {b}.", "code": f"def {a}_{b}(x):\n    return x.{b}.{a}\n"}
        )
    return out


@pytest.fixture()
def base_model(tmp_path, tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64
    )
    folder = tmp_path / "base"
    save_pretrained(Transformer(cfg), folder)
    tokenizer.save(folder)
    return folder


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_training_through_the_trainer_improves_retrieval(tmp_path, base_model, tokenizer) -> None:
    pooling, learn = "last", True
    train = [*pairs(64, 0), {"docstring": "no code"}]
    cfg = load_config(
        EmbedConfig,
        data={
            "init_from": str(base_model),
            "run_dir": str(tmp_path / "run"),
            "max_steps": 12,
            "data": {"seq_len": 40},
            "batch": {"micro_batch_size": 16},
            "optim": {"lr": 3e-3, "weight_decay": 0.0},
            "schedule": {"name": "constant", "warmup_steps": 0},
            "embed": {
                "paths": [write_jsonl(tmp_path / "train.jsonl", train)],
                "val_paths": [write_jsonl(tmp_path / "val.jsonl", pairs(32, 1))],
                "query_key": "docstring",
                "doc_key": "code",
                "pooling": pooling,
                "temperature": 0.1,
                "learn_temperature": learn,
            },
            "log": {"every_steps": 10, "val_every_steps": 12, "plots": False, "progress": False},
            "checkpoint": {"every_steps": 0},
        },
    )
    summary = run_embed(cfg, progress=False)
    assert summary["step"] == 12
    assert summary["data"]["train"]["pairs"] == 64
    assert summary["data"]["train"]["rejected"] == {"missing_text": 1}
    assert summary["heldout_mrr@10"] > summary["heldout_mrr@10_before"]
    assert summary["heldout_mrr@10"] > 0.5
    assert summary["temperature"] != pytest.approx(0.1)  # learned
    # the export loads back with the same embeddings, and the CLI evaluates it
    loaded = load_embedding_model(summary["model_dir"])
    assert loaded.pooling == pooling
    texts = [p["code"] for p in pairs(4, 2)]
    again = encode(loaded, tokenizer, texts, 40)
    assert again.shape == (4, 32) and torch.allclose(again.norm(dim=1), torch.ones(4), atol=1e-5)
    assert main(["embed", "eval", summary["model_dir"], str(tmp_path / "val.jsonl"), "--query-key", "docstring", "--doc-key", "code", "--max-len", "40"]) == 0  # fmt: skip
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"id": f"c{i}", "text": t} for i, t in enumerate(texts)])
    out = tmp_path / "vectors.jsonl"
    assert main(["embed", "encode", summary["model_dir"], docs, "--out", str(out), "--max-len", "40"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["c0", "c1", "c2", "c3"]
    assert rows[0]["text"] == texts[0]
    assert torch.allclose(torch.tensor([r["meta"]["embedding"] for r in rows]), again, atol=1e-5)


def test_a_batch_of_pairs_through_the_model(tokenizer) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=32
    )
    model = EmbeddingModel(Transformer(cfg), "mean", 0.05, learn=True)
    batch = collate_pairs([((5, 6, 7), (8, 9)), ((10,), (11, 12, 13, 14))], pad_id=0)
    assert batch["lengths"].tolist() == [3, 1, 2, 4] and batch["input_ids"].shape == (4, 4)
    out = model(batch["input_ids"], batch["lengths"])
    single = model(torch.tensor([[10]]), torch.tensor([1]))
    assert torch.allclose(out[1], single[0], atol=1e-5)  # right padding does not change an embedding
    assert model.scale().item() == pytest.approx(math.log(20.0))
    assert [n for n, _ in model.named_parameters() if "lm_head" in n] == []
    fixed = EmbeddingModel(Transformer(cfg), "last", 0.1, learn=False)
    assert "logit_scale" not in dict(fixed.named_parameters())  # a fixed temperature is not trained
    assert fixed.scale().item() == pytest.approx(math.log(10.0))


def test_the_shipped_recipe_is_a_valid_config() -> None:
    from pathlib import Path

    recipe = Path(__file__).parents[2] / "recipes" / "align" / "embed.yaml"
    cfg = load_config(EmbedConfig, recipe)
    assert (cfg.embed.query_key, cfg.embed.doc_key, cfg.embed.pooling) == ("docstring", "code", "mean")
    with pytest.raises(ValueError, match="pooling"):
        load_config(EmbedConfig, recipe, ["embed.pooling=max"])
