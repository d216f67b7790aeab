import pytest
import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.model.knn_memory import KNNMemory, KNNMemoryConfig, memory_forward, retrieve

SHAPE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**SHAPE, **overrides})).eval()


def test_top_k_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    q, keys, values = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 3, 40, 8, generator=g), None
    values = torch.randn(2, 3, 40, 8, generator=g)
    top, picked = retrieve(q, keys, values, 6)
    assert top.shape == (2, 3, 5, 6) and picked.shape == (2, 3, 5, 6, 8)
    for b in range(2):
        for h in range(3):
            for s in range(5):
                scores = [float(q[b, h, s] @ keys[b, h, m]) for m in range(40)]
                best = sorted(range(40), key=lambda m: -scores[m])[:6]
                assert top[b, h, s].tolist() == pytest.approx([scores[m] for m in best], abs=1e-5)
                torch.testing.assert_close(picked[b, h, s], values[b, h, best])
    # k beyond the memory takes everything
    assert retrieve(q, keys[:, :, :4], values[:, :, :4], 10)[0].shape[-1] == 4


def test_memory_keeps_the_newest_entries():
    memory = KNNMemory(KNNMemoryConfig(layers=(0,), size=5))
    for i in range(3):
        memory.add(0, torch.full((1, 1, 3, 2), float(i)), torch.full((1, 1, 3, 2), float(i)))
    assert len(memory) == 5
    assert memory.keys[0][0, 0, :, 0].tolist() == [1.0, 1.0, 2.0, 2.0, 2.0]


def test_without_memory_the_model_is_unchanged():
    plain = tiny()
    with_option = tiny(knn_memory={"layers": [1], "gate": "learned"})
    with_option.load_state_dict(plain.state_dict(), strict=False)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(with_option(ids).logits, plain(ids).logits)
        # a memory that is still empty: the first segment is plain local attention
        first = with_option(
            ids[:1], position_ids=torch.arange(12)[None], memory=KNNMemory.for_model(with_option.cfg)
        )
        torch.testing.assert_close(first.logits, plain(ids[:1]).logits, atol=1e-5, rtol=1e-5)
    assert set(with_option.state_dict()) - set(plain.state_dict()) == {"blocks.1.attn.memory_gate"}
    # the model is built on the meta device and initialised after: the gate gets its configured start
    gated = tiny(knn_memory={"layers": [0, 1], "gate": "learned", "gate_value": 0.7})
    for i in ("0", "1"):
        assert gated.blocks[i].attn.memory_gate.tolist() == pytest.approx([0.7] * 4)


def test_exact_past_with_joint_softmax_equals_full_attention():
    model = tiny(knn_memory={"layers": [0, 1], "gate": "joint", "top_k": 64})
    ids = torch.randint(0, 64, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        full = model(torch.tensor([ids])).logits[0]
        segmented = memory_forward(model, ids, 7, absolute_positions=True)
        torch.testing.assert_close(segmented, full, atol=1e-4, rtol=1e-4)
        # a top_k smaller than the memory drops keys: no longer full attention
        model.cfg.knn_memory = {**model.cfg.knn_memory, "top_k": 2}
        assert not torch.allclose(memory_forward(model, ids, 7, absolute_positions=True), full, atol=1e-3)


def test_gate_mixes_local_and_memory_attention():
    ids = torch.randint(0, 64, (21,), generator=torch.Generator().manual_seed(3)).tolist()
    local_only = tiny(seed=4, knn_memory={"layers": [1], "gate": "fixed", "gate_value": 0.0})
    with torch.no_grad():
        segmented = memory_forward(local_only, ids, 7)
        # g = 0: each segment is a plain forward of its own tokens at positions 0..6
        for start in (0, 7, 14):
            alone = local_only(torch.tensor([ids[start : start + 7]])).logits[0]
            torch.testing.assert_close(segmented[start : start + 7], alone, atol=1e-5, rtol=1e-5)
        half = tiny(seed=4, knn_memory={"layers": [1], "gate": "fixed", "gate_value": 0.5})
        learned = tiny(seed=4, knn_memory={"layers": [1], "gate": "learned", "gate_value": 0.0})
        # a learned gate at logit 0 is sigmoid(0) = 0.5 in every head: the fixed 0.5 mix
        torch.testing.assert_close(memory_forward(learned, ids, 7), memory_forward(half, ids, 7))
        assert not torch.allclose(memory_forward(half, ids, 7)[7:], segmented[7:], atol=1e-4)
    # the learned gate gets gradients from a segment that uses the memory
    memory = KNNMemory.for_model(learned.cfg)
    learned(torch.tensor([ids[:7]]), position_ids=torch.arange(7)[None], memory=memory)
    out = learned(torch.tensor([ids[7:14]]), position_ids=torch.arange(7)[None], memory=memory)
    out.logits.sum().backward()
    assert learned.blocks["1"].attn.memory_gate.grad.abs().sum() > 0


def test_config_validation():
    with pytest.raises(ValueError, match=r"knn_memory\.layers"):
        ModelConfig(**SHAPE, knn_memory={"layers": [2]})
    with pytest.raises(ValueError, match=r"knn_memory\.gate"):
        ModelConfig(**SHAPE, knn_memory={"layers": [0], "gate": "sometimes"})
    model = tiny(knn_memory={"layers": [0]})
    from lmforge.model.cache import ContiguousKVCache

    with pytest.raises(ValueError, match="without a KV cache"):
        model(
            torch.tensor([[1, 2]]),
            cache=ContiguousKVCache.for_model(model.cfg, 1, 4),
            memory=KNNMemory.for_model(model.cfg),
        )


def test_a_model_with_a_learned_gate_saves_and_loads(tmp_path):
    from lmforge.model.hf import load_pretrained, save_pretrained

    model = tiny(knn_memory={"layers": [1], "gate": "learned", "gate_value": -1.0})
    with torch.no_grad():
        model.blocks["1"].attn.memory_gate.copy_(torch.tensor([0.5, -2.0, 1.0, 3.0]))
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path).eval()
    assert loaded.cfg.knn_memory == model.cfg.knn_memory
    torch.testing.assert_close(loaded.blocks["1"].attn.memory_gate, model.blocks["1"].attn.memory_gate)
    ids = torch.randint(0, 64, (21,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        torch.testing.assert_close(memory_forward(loaded, ids, 7), memory_forward(model, ids, 7))
