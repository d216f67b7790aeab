import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from lmforge.cli import main
from lmforge.model import ModelConfig, Transformer
from lmforge.shards.format import ShardStats, build_manifest, write_manifest, write_shard
from lmforge.shards.mixture import MixtureConfig, mixture_weights
from lmforge.train.doremi import DoReMiObjective, DoReMiWeights, domain_weighted_loss, per_domain_excess_loss

from .conftest import EOS, VOCAB, tiny_data


def two_domain_shards(folder: Path) -> Path:
    """'count': documents that count 1..12 (learnable); 'noise': uniform random tokens (not learnable)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    records = []
    for domain in ("count", "noise"):
        docs = []
        for _ in range(60):
            n = int(rng.integers(20, 50))
            if domain == "count":
                start = int(rng.integers(1, 13))
                body = [(start + i - 1) % 12 + 1 for i in range(n)]
            else:
                body = rng.integers(1, VOCAB, size=n).tolist()
            docs.append(np.array([*body, EOS], dtype=np.int64))
        stats = ShardStats(docs=len(docs), tokens=sum(map(len, docs)))
        records.append(write_shard(folder, domain, docs, np.dtype(np.uint16), stats, {"domain": domain}))
    write_manifest(folder, build_manifest(records, np.dtype(np.uint16), VOCAB, EOS, "f" * 64))
    return folder


def tiny_model(seed: int) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=32)
    return Transformer(cfg)


def test_objective_matches_a_manual_doremi_step() -> None:
    torch.manual_seed(0)
    proxy, reference = tiny_model(1), tiny_model(2)
    input_ids = torch.randint(1, VOCAB, (3, 8))
    labels = torch.randint(1, VOCAB, (3, 8))
    labels[1, :3] = -100
    batch = {"input_ids": input_ids, "labels": labels, "domain_ids": torch.tensor([0, 1, 0])}
    weights = DoReMiWeights(["a", "b"])
    out = DoReMiObjective(reference, weights)(proxy, batch)

    def per_token(model):
        logits = model(input_ids).logits
        return F.cross_entropy(
            logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="none", ignore_index=-100
        )

    proxy_loss = per_token(proxy).reshape(3, 8).detach()
    with torch.no_grad():
        ref_loss = per_token(reference).reshape(3, 8)
    mask = labels != -100
    rows = {0: [0, 2], 1: [1]}
    excess = [
        float(sum((proxy_loss[r] - ref_loss[r]).clamp_min(0)[mask[r]].sum() for r in rows[d]))
        / float(sum(mask[r].sum() for r in rows[d]))
        for d in (0, 1)
    ]
    unnorm = [0.5 * math.exp(e) for e in excess]
    alpha = [(1 - 1e-4) * u / sum(unnorm) + 1e-4 / 2 for u in unnorm]
    assert weights.alpha == pytest.approx(alpha, rel=1e-5)
    means = [
        float(sum(proxy_loss[r][mask[r]].sum() for r in rows[d]) / sum(mask[r].sum() for r in rows[d]))
        for d in (0, 1)
    ]
    count = int(mask.sum())
    assert out.count == count
    assert float(out.loss_sum.detach()) / count == pytest.approx(
        alpha[0] * means[0] + alpha[1] * means[1], rel=1e-5
    )
    # a forward without gradients (validation) does not move alpha
    with torch.no_grad():
        DoReMiObjective(reference, weights)(proxy, batch)
    assert weights.steps == 1


@pytest.mark.slow
def test_lmforge_data_doremi_trains_reference_and_proxy_and_writes_weights(tmp_path: Path, capsys) -> None:
    shards = two_domain_shards(tmp_path / "shards")
    recipe = {
        "train": tiny_data(tmp_path / "unused", shards, max_steps=6),
        "run_dir": str(tmp_path / "doremi"),
    }
    (tmp_path / "doremi.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["doremi", "--config", str(tmp_path / "doremi.yaml"), "reference_steps=30"]) == 0
    saved = json.loads((tmp_path / "doremi" / "domain_weights.json").read_text())
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{") :]) == {"domain_weights": saved["domain_weights"]}
    assert saved["steps"] == 6 and sum(saved["domain_weights"].values()) == pytest.approx(1.0)
    # the reference learnt to count, the young proxy not yet: its excess loss, and weight, is on "count";
    # on random tokens neither model can beat the other by much
    assert saved["domain_weights"]["count"] > 0.6, saved
    assert (tmp_path / "doremi" / "reference" / "metrics.jsonl").is_file()


def test_weight_update_matches_a_hand_computation() -> None:
    doremi = DoReMiWeights(["web", "code", "math"])  # eta = 1, eps = 1e-4, alpha_0 = 1/3 each
    # step 1: alpha' = (1/3) * exp([0.5, 0, 1]) -> normalised [1.64872, 1, 2.71828] / 5.36700,
    # then (1 - 1e-4) * alpha + 1e-4 / 3
    first = doremi.update([0.5, 0.0, 1.0])
    assert first == pytest.approx([0.3071985, 0.1863384, 0.5064631], abs=1e-7)
    # step 2 starts from step 1's alpha: code's excess 2.0 multiplies it by e^2 = 7.389
    second = doremi.update(np.array([0.0, 2.0, 0.0]))
    assert second == pytest.approx([0.1402589, 0.6285248, 0.2312163], abs=1e-7)
    assert sum(second) == pytest.approx(1.0)
    # the output is the average of alpha_t over the steps
    assert doremi.average == pytest.approx([0.2237287, 0.4074316, 0.3688397], abs=1e-7)
    assert doremi.steps == 2


def test_no_excess_keeps_uniform_and_huge_excess_does_not_overflow() -> None:
    doremi = DoReMiWeights(["a", "b"])
    assert doremi.update([0.0, 0.0]) == pytest.approx([0.5, 0.5])
    alpha = doremi.update([5000.0, 0.0])
    assert np.isfinite(alpha).all()
    # the smoothing keeps every domain at least eps / k
    assert alpha == pytest.approx([1 - 1e-4 / 2, 1e-4 / 2])


def test_per_domain_excess_loss_clips_and_averages_per_token() -> None:
    proxy = torch.tensor([[2.0, 1.0, 3.0], [0.5, 0.5, 4.0], [1.0, 1.0, 1.0]])
    reference = torch.tensor([[1.0, 2.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    domains = torch.tensor([0, 1, 0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    excess = per_domain_excess_loss(proxy, reference, domains, num_domains=3, mask=mask)
    # domain 0: rows 0 and 2 -> clipped excess [1, 0, 2] + [1, 1, 1] = 6 over 6 tokens
    # domain 1: row 1, last token masked -> [0, 0.5] = 0.5 over 2 tokens; domain 2: no tokens -> 0
    assert excess.tolist() == pytest.approx([1.0, 0.25, 0.0])


def test_domain_weighted_loss_and_its_gradient() -> None:
    token_loss = torch.tensor([[1.0, 3.0], [4.0, 6.0]], requires_grad=True)
    loss = domain_weighted_loss(token_loss, torch.tensor([0, 1]), torch.tensor([0.25, 0.75]))
    assert loss.item() == pytest.approx(0.25 * 2.0 + 0.75 * 5.0)
    loss.backward()
    assert torch.allclose(token_loss.grad, torch.tensor([[0.125, 0.125], [0.375, 0.375]]))


def test_weights_file_is_read_by_the_mixture(tmp_path) -> None:
    doremi = DoReMiWeights(["web", "code"])
    doremi.update([0.0, 1.0])
    path = tmp_path / "doremi.json"
    doremi.save(path)
    data = json.loads(path.read_text())
    assert data["method"] == "doremi" and data["steps"] == 1 and data["eta"] == 1.0
    weights = mixture_weights(
        MixtureConfig(strategy="fixed", weights_file=str(path)), {"web": 10, "code": 10}
    )
    assert weights == pytest.approx(doremi.as_dict())
    assert weights["code"] > weights["web"]
