"""Mamba layers: chunked scan = recurrence = transformers' MambaForCausalLM; hybrids; decoding state."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from lmforge.model.config import ModelConfig
from lmforge.model.hf import ModelLoadError, hf_family, load_pretrained, save_pretrained
from lmforge.model.mamba import MambaMixer, RecurrentCache, generate_greedy, selective_scan
from lmforge.model.transformer import Transformer

transformers = pytest.importorskip("transformers")
# the pure-torch fallbacks announce themselves on every call
logging.getLogger("transformers").setLevel(logging.ERROR)

TOL = 1e-4
MAMBA = dict(vocab_size=61, d_model=16, n_layers=2, n_heads=2, position="none", init_std=0.3)
HYBRID = dict(MAMBA, n_layers=3, position="rope", d_ff=32, layer_types=["mamba", "attention", "mamba"])


def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    fields = {**MAMBA, "layer_types": ["mamba"] * MAMBA["n_layers"], "mamba_scan_chunk": 4, **overrides}
    return Transformer(ModelConfig(**fields)).eval()


def reference_scan(x, dt, A, B, C, h0):
    """The recurrence written out step by step (Gu & Dao 2023, Algorithm 2), in float64."""
    h = h0.double()
    ys = []
    for t in range(x.shape[1]):
        h = torch.exp(dt[:, t, :, None].double() * A.double()) * h
        h = h + dt[:, t, :, None].double() * B[:, t, None, :].double() * x[:, t, :, None].double()
        ys.append((h * C[:, t, None, :].double()).sum(-1))
    return torch.stack(ys, 1), h


@pytest.mark.parametrize("parallel", [True, False], ids=["hillis-steele", "stepwise"])
@pytest.mark.parametrize("chunk", [1, 3, 8, 64])
def test_chunked_scan_equals_the_recurrence(chunk: int, parallel: bool) -> None:
    torch.manual_seed(1)
    b, length, d, n = 2, 29, 5, 4
    x, B, C = torch.randn(b, length, d), torch.randn(b, length, n), torch.randn(b, length, n)
    dt = torch.rand(b, length, d) * 3  # large steps: exp(dt*A) spans many orders of magnitude
    A = -torch.rand(d, n) * 8
    h0 = torch.randn(b, d, n)
    y, h = selective_scan(x, dt, A, B, C, h0=h0, chunk=chunk, parallel=parallel)
    y_ref, h_ref = reference_scan(x, dt, A, B, C, h0)
    assert torch.allclose(y.double(), y_ref, atol=1e-5) and torch.allclose(h.double(), h_ref, atol=1e-5)


@pytest.mark.parametrize("parallel", [True, False], ids=["hillis-steele", "stepwise"])
def test_chunked_scan_gradients_equal_the_recurrence(parallel: bool) -> None:
    torch.manual_seed(2)
    b, length, d, n = 1, 19, 3, 2
    inputs = [torch.randn(b, length, d), torch.rand(b, length, d), -torch.rand(d, n) * 2]
    inputs += [torch.randn(b, length, n), torch.randn(b, length, n)]
    ours = [t.clone().requires_grad_() for t in inputs]
    ref = [t.double().requires_grad_() for t in inputs]
    selective_scan(*ours, chunk=4, parallel=parallel)[
        0
    ].square().sum().backward()  # chunks are checkpointed here
    reference_scan(*ref, torch.zeros(b, d, n))[0].square().sum().backward()
    for a, r in zip(ours, ref):
        assert torch.allclose(a.grad.double(), r.grad, atol=1e-4)


def test_recurrent_step_equals_chunked_forward_for_the_mixer() -> None:
    torch.manual_seed(3)
    cfg = ModelConfig(**{**MAMBA, "layer_types": ["mamba"] * 2, "mamba_scan_chunk": 4})
    mixer = MambaMixer(cfg)
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            if name not in ("A_log", "D", "dt_proj.bias"):  # keep the SSM init: the outputs stay O(1)
                p.normal_(0, 0.3)
        hidden = torch.randn(2, 23, cfg.d_model)
        full, _ = mixer(hidden)
        state = mixer.new_state(2, torch.float32, "cpu")
        steps = []
        for t in range(hidden.shape[1]):
            out, state = mixer.step(hidden[:, t], state)
            steps.append(out)
    assert full.abs().mean() > 0.1
    assert torch.allclose(torch.stack(steps, 1), full, atol=TOL)


@pytest.mark.parametrize("fields", [{}, HYBRID], ids=["mamba", "hybrid"])
def test_decoding_with_state_equals_the_full_forward(fields: dict) -> None:
    model = tiny(**fields)
    ids = torch.randint(0, 61, (2, 22))
    with torch.no_grad():
        full = model(ids).logits
        cache = RecurrentCache.for_model(model.cfg, 2, 32)
        prefill = model(ids[:, :9], cache=cache).logits  # chunked scan from a zero state
        split = model(ids[:, 9:14], cache=cache).logits  # chunked scan continuing a state
        steps = [model(ids[:, t : t + 1], cache=cache).logits for t in range(14, 22)]  # recurrent steps
    assert torch.allclose(torch.cat([prefill, split, *steps], 1), full, atol=TOL)
    assert cache.lengths().tolist() == [22, 22]


def test_state_memory_is_constant_in_length_and_needs_no_kv_for_pure_mamba() -> None:
    cfg = tiny().cfg
    short, long = RecurrentCache.for_model(cfg, 1, 16), RecurrentCache.for_model(cfg, 1, 16384)
    assert short.kv is None and short.nbytes() == long.nbytes()
    per_layer = cfg.mamba_d_inner * (cfg.mamba_d_conv + cfg.mamba_d_state) * 4
    assert short.nbytes() == cfg.n_layers * per_layer


def test_padding_leaves_the_state_untouched() -> None:
    model = tiny(**HYBRID)
    ids = torch.randint(1, 61, (2, 10))
    with torch.no_grad():
        alone = model(ids[:1, 3:]).logits
        # row 0 left-padded by 3, row 1 a full prompt
        positions = torch.tensor([[-1, -1, -1, *range(7)], list(range(10))])
        cache = RecurrentCache.for_model(model.cfg, 2, 16)
        padded = model(ids, position_ids=positions, cache=cache).logits
        assert torch.allclose(padded[0, 3:], alone[0], atol=TOL)
        assert cache.lengths().tolist() == [7, 10]
        # row 1 sits out a step (position -1): its state must be exactly as before
        before = {k: (c.clone(), s.clone()) for k, (c, s) in cache.states.items()}
        model(ids[:, :1], position_ids=torch.tensor([[7], [-1]]), cache=cache)
        for layer, (conv, ssm) in cache.states.items():
            assert torch.equal(conv[1], before[layer][0][1]) and torch.equal(ssm[1], before[layer][1][1])
            assert not torch.equal(ssm[0], before[layer][1][0])


def test_packed_documents_restart_the_state() -> None:
    model = tiny(**HYBRID)
    a, b = torch.randint(0, 61, (1, 7)), torch.randint(0, 61, (1, 6))
    segments = torch.tensor([[0] * 7 + [1] * 6])
    positions = torch.cat([torch.arange(7), torch.arange(6)])[None]
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), position_ids=positions, segment_ids=segments).logits
        assert torch.allclose(packed[:, :7], model(a).logits, atol=TOL)
        assert torch.allclose(packed[:, 7:], model(b).logits, atol=TOL)


@pytest.mark.parametrize("fields", [{}, HYBRID], ids=["mamba", "hybrid"])
def test_greedy_generation_equals_the_argmax_of_the_full_forward(fields: dict) -> None:
    model = tiny(**fields)
    prompt = torch.randint(0, 61, (2, 5))
    new = generate_greedy(model, prompt, 12)
    seq = torch.cat([prompt, new], 1)
    with torch.no_grad():
        expected = model(seq).logits[:, 4:-1].argmax(-1)
    assert torch.equal(new, expected)
    assert len(set(new.flatten().tolist())) > 2  # not a degenerate constant output


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="layer_types: 1 entries"):
        ModelConfig(**{**MAMBA, "layer_types": ["mamba"]})
    with pytest.raises(ValueError, match=r"layer_types\[1\]"):
        ModelConfig(**{**MAMBA, "layer_types": ["mamba", "rnn"]})
    with pytest.raises(ValueError, match="norm_position=pre"):
        ModelConfig(**{**MAMBA, "layer_types": ["mamba"] * 2, "norm_position": "post"})
    with pytest.raises(ValueError, match="structure must be causal"):
        ModelConfig(**{**MAMBA, "layer_types": ["attention", "mamba"], "structure": "prefix"})
    assert ModelConfig(**{**MAMBA, "d_model": 40}).mamba_dt_rank == 3  # ceil(40 / 16)


def test_a_mamba_model_refuses_a_kv_cache() -> None:
    from lmforge.model.cache import ContiguousKVCache

    model = tiny()
    cache = ContiguousKVCache.for_model(model.cfg, 1, 8)
    with pytest.raises(ValueError, match="RecurrentCache"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


# ------------------------------------------------------------------------------ transformers MambaForCausalLM


def hf_mamba(tie: bool = True, use_bias: bool = False, conv_bias: bool = True, seed: int = 0):
    """A tiny random MambaForCausalLM with weights spread wide enough that every part of the mixer matters."""
    torch.manual_seed(seed)
    config = transformers.MambaConfig(
        vocab_size=61,
        hidden_size=24,
        state_size=6,
        num_hidden_layers=2,
        expand=2,
        conv_kernel=3,
        time_step_rank=5,
        use_bias=use_bias,
        use_conv_bias=conv_bias,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.MambaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand_like(p) * 4 + 0.5))
            elif not name.endswith("norm.weight") and not name.endswith("norm_f.weight"):
                p.normal_(0, 0.4)
    return model


@pytest.mark.parametrize(
    "variant",
    [dict(), dict(tie=False, use_bias=True), dict(conv_bias=False)],
    ids=["tied", "untied-bias", "no-conv-bias"],
)
def test_transformers_mamba_loads_and_exports_with_logit_parity(tmp_path: Path, variant: dict) -> None:
    hf = hf_mamba(**variant)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    assert ours.cfg.layer_types == ["mamba", "mamba"] and ours.cfg.mamba_dt_rank == 5
    ids = torch.randint(0, 61, (2, 19))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids).logits
    assert expected.std() > 1.0
    assert torch.allclose(got, expected, atol=TOL)

    assert save_pretrained(ours, tmp_path / "out") == "mamba"
    back = transformers.MambaForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, got, atol=TOL)


def test_greedy_generation_equals_transformers_generate(tmp_path: Path) -> None:
    hf = hf_mamba(seed=1)
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    prompt = torch.randint(1, 61, (2, 7))
    expected = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=16,
        do_sample=False,
        use_cache=True,
        eos_token_id=None,
        pad_token_id=0,
    )[:, 7:]
    got = generate_greedy(ours, prompt, 16)
    assert len(set(expected.flatten().tolist())) > 2
    assert torch.equal(got, expected)


def test_hybrid_maps_onto_no_hf_family_and_round_trips_in_our_layout(tmp_path: Path) -> None:
    model = tiny(**HYBRID)
    assert hf_family(model.cfg) is None
    with pytest.raises(ModelLoadError, match="closest, mamba, needs: every layer mamba"):
        save_pretrained(model, tmp_path / "x", hf_format=True)
    assert save_pretrained(model, tmp_path / "ours") is None
    back = load_pretrained(tmp_path / "ours")
    ids = torch.randint(0, 61, (1, 9))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    # an attention model never maps onto mamba, a Mamba model never onto an attention family
    assert hf_family(dataclasses.replace(model.cfg, layer_types=None)) != "mamba"
