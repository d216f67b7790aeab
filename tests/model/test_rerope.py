"""ReRoPE / Leaky ReRoPE: the two-pass attention against an explicit relative-position reference, and the model."""

import math

import pytest
import torch

from lmforge.model import ContiguousKVCache, ModelConfig, Transformer
from lmforge.model.hf import hf_family
from lmforge.model.positions import apply_rope, rope_cos_sin
from lmforge.model.rerope import ReRoPE
from lmforge.model.rope_scaling import rope_frequencies

# init_std large enough that attention is far from uniform, so positions show in the logits
TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, init_std=0.2)


def _reference(rerope: ReRoPE, q, k, v, q_pos, k_pos):
    """Per (i, j): rotate q_i by f(i - j) alone and dot with the unrotated k_j (RoPE: R(m)q·R(n)k = R(m-n)q·k);
    causal softmax over the keys."""
    batch, heads, n_q, dim = q.shape
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    v = v.repeat_interleave(heads // v.shape[1], dim=1)
    scores = torch.full((batch, heads, n_q, k.shape[2]), float("-inf"))
    for b in range(batch):
        for i in range(n_q):
            for j in range(k.shape[2]):
                d = q_pos[b, i] - k_pos[b, j]
                if d < 0:
                    continue
                f = rerope.relative(d[None])[None]
                cos, sin = rope_cos_sin(f, rerope.inv_freq, rerope.attention_factor)
                rotated = apply_rope(q[b : b + 1, :, i : i + 1], cos, sin)[0, :, 0]
                scale = rerope.attention_factor
                scores[b, :, i, j] = (rotated * k[b, :, j] * scale).sum(-1) / math.sqrt(dim)
    return scores.softmax(dim=-1) @ v


def test_relative_distance_map():
    inv_freq, _ = rope_frequencies(ModelConfig(d_model=32, n_heads=4))
    d = torch.tensor([0, 3, 4, 5, 12])
    assert ReRoPE(inv_freq, 1.0, window=4).relative(d).tolist() == [0, 3, 4, 4, 4]
    assert ReRoPE(inv_freq, 1.0, window=4, leak=4.0).relative(d).tolist() == [0, 3, 4, 4.25, 6]


@pytest.mark.parametrize("leak", [None, 3.0])
def test_two_pass_attention_equals_the_explicit_relative_position_reference(leak):
    torch.manual_seed(0)
    inv_freq, _ = rope_frequencies(ModelConfig(d_model=32, n_heads=4))
    rerope = ReRoPE(inv_freq, 1.2, window=3, leak=leak)  # attention factor != 1 too
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    k_pos = torch.arange(9).expand(2, 9)
    q_pos = k_pos[:, 4:]
    mask = (k_pos[:, None, :] <= q_pos[:, :, None])[:, None]
    got = rerope(q, k, v, q_pos, k_pos, mask)
    torch.testing.assert_close(got, _reference(rerope, q, k, v, q_pos, k_pos), atol=1e-5, rtol=1e-5)


def _pair(**rerope):
    torch.manual_seed(0)
    plain = Transformer(ModelConfig(**TINY)).eval()
    model = Transformer(ModelConfig(**TINY, **rerope)).eval()
    model.load_state_dict(plain.state_dict())
    return plain, model


@pytest.mark.parametrize("leak", [None, 2.0])
def test_equals_plain_rope_when_the_window_covers_the_sequence(leak):
    plain, model = _pair(rerope_window=19, rerope_leak=leak)  # largest distance: 19
    ids = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, atol=1e-5, rtol=1e-5)
        shorter = _pair(rerope_window=10, rerope_leak=leak)[1]
        assert (shorter(ids).logits - plain(ids).logits).abs().max() > 1e-4


@pytest.mark.parametrize("leak", [None, 2.0])
def test_cached_decoding_equals_the_full_forward(leak):
    _, model = _pair(rerope_window=4, rerope_leak=leak)
    ids = torch.randint(0, 64, (2, 14))
    with torch.no_grad():
        want = model(ids).logits
        cache = ContiguousKVCache.for_model(model.cfg, batch=2, max_len=14)
        pieces = [model(ids[:, :6], cache=cache).logits]
        pieces += [model(ids[:, i : i + 1], cache=cache).logits for i in range(6, 14)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), want, atol=1e-5, rtol=1e-5)


def test_training_forward_backpropagates():
    _, model = _pair(rerope_window=4)
    model.train()
    ids = torch.randint(0, 64, (2, 12))
    model(ids).logits.sum().backward()
    assert model.blocks["0"].attn.q_proj.weight.grad.abs().sum() > 0


def test_config_checks_and_no_hugging_face_family():
    with pytest.raises(ValueError, match="rerope_window"):
        ModelConfig(**TINY, position="alibi", rerope_window=4)
    with pytest.raises(ValueError, match="rerope_leak"):
        ModelConfig(**TINY, rerope_leak=2.0)
    assert hf_family(ModelConfig(**TINY, rerope_window=4)) is None
