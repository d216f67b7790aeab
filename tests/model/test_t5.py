"""T5 encoder-decoder against transformers' T5ForConditionalGeneration on tiny random t5 / t5-v1_1 models built
offline here: logits, load and export, greedy and beam-search generation."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from lmforge.model.hf import ModelLoadError, load_pretrained, save_pretrained
from lmforge.model.t5 import T5Config, T5Model, generate, shift_right

TINY = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0)
STYLES = {
    # original T5: ReLU MLP, tied embeddings, decoder output rescaled by d_model**-0.5
    "t5": dict(TINY, feed_forward_proj="relu"),
    # T5 v1.1: gated-GELU, no rescaling, 3 decoder layers against 2 encoder layers
    "t5-v1_1": dict(TINY, feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_decoder_layers=3),
}


def _hf_model(style: str, folder, seed: int = 0, **overrides) -> transformers.T5ForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = transformers.T5Config(
        **{**STYLES[style], **overrides},
        dropout_rate=0.0,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
    )
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # transformers' init leaves norms at 1; make them matter
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return model


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    # longer than relative_attention_max_distance, so the log-spaced and the last bucket are exercised
    src = torch.randint(2, 96, (2, 21), generator=g)
    mask = torch.ones_like(src)
    mask[1, 15:] = 0  # right padding on the second source
    tgt = torch.randint(2, 96, (2, 19), generator=g)
    return src, mask, tgt


@pytest.mark.parametrize("style", list(STYLES))
def test_logits_match_transformers(style, tmp_path):
    hf = _hf_model(style, tmp_path)
    ours = load_pretrained(tmp_path)
    assert isinstance(ours, T5Model)
    assert ours.cfg.scale_decoder_outputs == (style == "t5")
    src, mask, tgt = _inputs()
    with torch.no_grad():
        want = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        got = ours(src, tgt, attention_mask=mask).logits
    assert (got - want).abs().max() <= 1e-4


@pytest.mark.parametrize("style", list(STYLES))
def test_export_loads_in_transformers(style, tmp_path):
    hf = _hf_model(style, tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    assert save_pretrained(ours, tmp_path / "out") == "t5"
    back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    src, mask, tgt = _inputs(2)
    with torch.no_grad():
        want = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        got = back(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
    assert (got - want).abs().max() <= 1e-5
    again = load_pretrained(tmp_path / "out")
    assert again.cfg == ours.cfg


def test_untied_head_is_loaded_and_exported(tmp_path):
    """A t5-v1_1 checkpoint carries its own lm_head.weight (transformers 5 then unties, as older versions did)."""
    _hf_model("t5-v1_1", tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    weights["lm_head.weight"] = torch.randn_like(weights["shared.weight"])
    save_file(weights, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert hf.lm_head.weight.data_ptr() != hf.shared.weight.data_ptr()
    ours = load_pretrained(tmp_path / "hf")
    assert not ours.cfg.tie_embeddings and ours.lm_head.weight is not ours.embed_tokens.weight
    src, mask, tgt = _inputs(3)
    with torch.no_grad():
        want = hf(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
        assert (ours(src, tgt, attention_mask=mask).logits - want).abs().max() <= 1e-4
        save_pretrained(ours, tmp_path / "out")
        back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
        assert (
            back(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits - want
        ).abs().max() <= 1e-5


def test_relative_bias_is_shared_and_directional():
    """One bias table per stack; encoder buckets are bidirectional, decoder buckets see only the past."""
    model = T5Model(
        T5Config(
            vocab_size=32,
            d_model=16,
            head_dim=4,
            d_ff=32,
            n_layers=3,
            n_heads=2,
            relative_buckets=8,
            relative_max_distance=16,
        )
    )
    names = [n for n, _ in model.named_parameters() if "relative" in n]
    assert names == ["encoder.relative_bias.weight", "decoder.relative_bias.weight"]
    pos = torch.arange(6)
    enc, dec = model.encoder.position_bias(pos, pos), model.decoder.position_bias(pos, pos)
    table_enc, table_dec = model.encoder.relative_bias.weight, model.decoder.relative_bias.weight
    # encoder: offset +1 and -1 fall in different buckets (4 buckets each way); decoder: every future offset is
    # bucket 0, the same as offset 0
    assert torch.equal(enc[0, :, 0, 1], table_enc[5]) and torch.equal(enc[0, :, 1, 0], table_enc[1])
    assert torch.equal(dec[0, :, 0, 3], table_dec[0]) and torch.equal(dec[0, :, 3, 1], table_dec[2])


@pytest.mark.parametrize("style", list(STYLES))
def test_incremental_decoding_equals_full_forward(style, tmp_path):
    _hf_model(style, tmp_path)
    model = load_pretrained(tmp_path)
    src, mask, tgt = _inputs(4)
    with torch.no_grad():
        full = model(src, tgt, attention_mask=mask).logits
        cache = model.start_decoding(model.encode(src, mask), mask)
        steps = [model.decode(tgt[:, :5], cache)] + [
            model.decode(tgt[:, i : i + 1], cache) for i in range(5, 19)
        ]
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5


@pytest.mark.parametrize("style", list(STYLES))
def test_generate_equals_transformers(style, tmp_path):
    # transformers' generate cache breaks when decoder and encoder depths differ: equal depths here
    hf = _hf_model(style, tmp_path, seed=5, num_decoder_layers=2)
    with torch.no_grad():
        # transformers' init makes tiny models repeat one token; wider weights give varied continuations,
        # and a longer EOS embedding makes some hypotheses finish early (finished-beam bookkeeping)
        for name, p in hf.named_parameters():
            if "layer_norm" not in name and "shared" not in name:
                p.normal_(0.0, 0.4)
        hf.shared.weight[1] *= {"t5": 4.0, "t5-v1_1": 2.5}[style]
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    g = torch.Generator().manual_seed(6)
    src = torch.randint(2, 96, (4, 21), generator=g)
    mask = torch.ones_like(src)
    mask[1, 15:] = 0
    outputs = []
    settings = [(1, 1.0, False), (3, 1.0, False), (3, 0.6, True), (4, 1.5, "never")]
    for num_beams, length_penalty, early_stopping in settings:
        want = hf.generate(
            input_ids=src,
            attention_mask=mask,
            max_new_tokens=12,
            num_beams=num_beams,
            do_sample=False,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
        )
        got = generate(ours, src, mask, 12, num_beams, length_penalty, early_stopping)
        assert torch.equal(got, want), (num_beams, got, want)
        outputs.append(got)
    assert not torch.equal(outputs[0], outputs[1])  # beam search chose differently somewhere
    assert (outputs[1] == 1).any()  # and some beam hypothesis ended with EOS


def test_shift_right_and_config_errors():
    labels = torch.tensor([[5, 6, -100]])
    assert shift_right(labels, 0, 0).tolist() == [[0, 5, 6]]
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Config(feed_forward_proj="tanh")
    with pytest.raises(ValueError, match="eos_token_id"):
        T5Config(vocab_size=8, eos_token_id=8)


def test_load_errors_name_the_file_and_key(tmp_path):
    _hf_model("t5", tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["encoder.block.0.layer.1.DenseReluDense.wi.weight"] = torch.zeros(3, 3)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"DenseReluDense\.wi\.weight"):
        load_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["d_kv"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="d_kv"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_runs_the_encoder_and_cross_projections_once(num_beams):
    torch.manual_seed(0)
    model = T5Model(T5Config(vocab_size=40, d_model=16, head_dim=4, d_ff=32, n_layers=2, n_heads=4))
    calls = {"encoder": 0, "cross_k": 0, "cross_v": 0, "decoder_q": 0}

    def count(key):
        def hook(*_):
            calls[key] += 1

        return hook

    model.encoder.blocks["0"].attn.q_proj.register_forward_hook(count("encoder"))
    model.decoder.blocks["1"].cross_attn.k_proj.register_forward_hook(count("cross_k"))
    model.decoder.blocks["1"].cross_attn.v_proj.register_forward_hook(count("cross_v"))
    model.decoder.blocks["1"].attn.q_proj.register_forward_hook(count("decoder_q"))
    out = generate(model, torch.randint(2, 40, (2, 9)), max_new_tokens=6, num_beams=num_beams)
    assert calls["encoder"] == calls["cross_k"] == calls["cross_v"] == 1
    assert calls["decoder_q"] == out.shape[1] - 1  # one decoder step per generated token
