"""Parity with transformers on tiny random models of each supported family, built offline in the test."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from lmforge.model import ContiguousKVCache, ModelConfig, Transformer
from lmforge.model.hf import ModelLoadError, hf_family, load_pretrained, read_config, save_pretrained
from lmforge.model.presets import get_preset

LLAMA_LIKE = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
FAMILIES = {
    "gpt2": (
        transformers.GPT2Config,
        transformers.GPT2LMHeadModel,
        dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=1),
    ),
    "llama": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            LLAMA_LIKE,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            rope_theta=500.0,
        ),
    ),
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        dict(LLAMA_LIKE, sliding_window=4),
    ),
    "qwen2": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        dict(LLAMA_LIKE, tie_word_embeddings=True),
    ),
    "mixtral": (
        transformers.MixtralConfig,
        transformers.MixtralForCausalLM,
        dict(LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2),
    ),
}
TOLERANCE = 1e-4
# less common settings of the same families: biases, GeGLU, an explicit head_dim, (un)tied heads
VARIANTS = {
    "llama-bias-geglu-head-dim": (
        "llama",
        dict(attention_bias=True, mlp_bias=True, hidden_act="gelu", head_dim=16, tie_word_embeddings=True),
    ),
    "gpt2-untied-relu": ("gpt2", dict(tie_word_embeddings=False, activation_function="relu", n_inner=40)),
    "mixtral-sliding-top1": ("mixtral", dict(sliding_window=3, num_experts_per_tok=1)),
}


def _hf_model(family: str, folder, **overrides):
    config_cls, model_cls, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**kwargs, **overrides})).eval()
    model.save_pretrained(folder)
    return model


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("case", sorted(FAMILIES) + sorted(VARIANTS))
def test_logits_match_transformers_full_and_incremental(case, tmp_path):
    family, overrides = VARIANTS.get(case, (case, {}))
    hf = _hf_model(family, tmp_path, **overrides)
    ours = load_pretrained(tmp_path)
    assert ours.cfg.extra["hf_model_type"] == family
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        want = hf(ids).logits
        assert _max_diff(ours(ids).logits, want) <= TOLERANCE
        cache = ContiguousKVCache.for_model(ours.cfg, batch=2, max_len=16)
        pieces = [ours(ids[:, :6], cache=cache).logits]
        pieces += [ours(ids[:, i : i + 1], cache=cache).logits for i in range(6, 10)]
    assert _max_diff(torch.cat(pieces, dim=1), want) <= TOLERANCE


@pytest.mark.parametrize("case", sorted(FAMILIES) + sorted(VARIANTS))
def test_export_loads_in_transformers_with_identical_logits(case, tmp_path):
    family, overrides = VARIANTS.get(case, (case, {}))
    _hf_model(family, tmp_path / "hf", **overrides)
    ours = load_pretrained(tmp_path / "hf")
    assert save_pretrained(ours, tmp_path / "out") == family
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == family and config["architectures"] == [FAMILIES[family][1].__name__]
    assert (tmp_path / "out" / "generation_config.json").is_file()
    reloaded = FAMILIES[family][1].from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert _max_diff(reloaded(ids).logits, ours(ids).logits) <= TOLERANCE
    # the exported tensors are exactly what transformers itself writes
    written, original = (
        load_file(tmp_path / "out" / "model.safetensors"),
        load_file(tmp_path / "hf" / "model.safetensors"),
    )
    assert written.keys() == original.keys()
    for key in original:
        assert torch.equal(written[key], original[key]), key


def test_gpt2_generation_config_keeps_special_tokens(tmp_path):
    _hf_model("gpt2", tmp_path / "hf")
    save_pretrained(load_pretrained(tmp_path / "hf"), tmp_path / "out")
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 0, "eos_token_id": 1}


def test_sharded_checkpoint_round_trip(tmp_path):
    _hf_model("llama", tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    save_pretrained(ours, tmp_path / "out", max_shard_bytes=20_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 2
    again = load_pretrained(tmp_path / "out")
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ours(ids).logits)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert _max_diff(hf(ids).logits, ours(ids).logits) <= TOLERANCE


def test_unmappable_config_is_refused_for_hf_and_round_trips_in_our_layout(tmp_path):
    cfg = ModelConfig(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, position="alibi", norm_position="sandwich"
    )
    model = Transformer(cfg).eval()
    assert hf_family(cfg) is None
    with pytest.raises(ModelLoadError, match=r"maps onto no Hugging Face family.*RoPE"):
        save_pretrained(model, tmp_path / "hf", hf_format=True)
    assert save_pretrained(model, tmp_path / "ours") is None
    assert read_config(tmp_path / "ours") == cfg
    again = load_pretrained(tmp_path / "ours")
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_tied_model_in_our_layout_stays_tied(tmp_path):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, tie_embeddings=True, qk_norm=True)
    save_pretrained(Transformer(cfg), tmp_path, hf_format=False)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    again = load_pretrained(tmp_path)
    assert again.lm_head.weight is again.embed_tokens.weight


@pytest.fixture
def llama_folder(tmp_path):
    _hf_model("llama", tmp_path)
    return tmp_path


def test_missing_weights(llama_folder):
    (llama_folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no model\.safetensors"):
        load_pretrained(llama_folder)


def test_truncated_safetensors(llama_folder):
    path = llama_folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors"):
        load_pretrained(llama_folder)


def test_missing_tensor_is_named(llama_folder):
    path = llama_folder / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(llama_folder)


def test_mismatched_shape_names_file_and_key(llama_folder):
    config = json.loads((llama_folder / "config.json").read_text())
    config["intermediate_size"] = 40
    (llama_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelLoadError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight'"
    ):
        load_pretrained(llama_folder)


def test_missing_shard_is_named(tmp_path):
    _hf_model("qwen2", tmp_path / "hf")
    save_pretrained(load_pretrained(tmp_path / "hf"), tmp_path / "out", max_shard_bytes=20_000)
    next((tmp_path / "out").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(ModelLoadError, match=r"model-00002-of-.*missing"):
        load_pretrained(tmp_path / "out")


def test_unknown_model_type(llama_folder):
    (llama_folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match=r"config\.json: unsupported model_type 'bert'"):
        load_pretrained(llama_folder)


def test_not_a_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="model folder not found"):
        load_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("preset", "family"),
    [
        ("tiny-gpt2", "gpt2"),
        ("tiny-llama", "llama"),
        ("tiny-mistral", "mistral"),
        ("tiny-qwen2", "qwen2"),
        ("tiny-mixtral", "mixtral"),
    ],
)
def test_our_presets_export_to_their_family_and_load_in_transformers(preset, family, tmp_path):
    model = Transformer(get_preset(preset)).eval()
    assert save_pretrained(model, tmp_path) == family
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (1, 40))  # longer than tiny-mistral's window
    with torch.no_grad():
        assert _max_diff(hf(ids).logits, model(ids).logits) <= TOLERANCE


def test_big_presets_map_onto_their_families():
    assert hf_family(get_preset("llama3-8b")) == "llama"
    assert hf_family(get_preset("mixtral-8x7b")) == "mixtral"
    assert hf_family(get_preset("qwen2-7b")) == "qwen2"
    assert hf_family(get_preset("gpt2-medium")) == "gpt2"


def test_loaded_parameters_are_contiguous(tmp_path):
    _hf_model("gpt2", tmp_path)
    model = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.is_contiguous() and p.dtype == torch.bfloat16 for p in model.parameters())


def test_original_gpt2_layout_without_prefix_and_with_mask_buffers(tmp_path):
    hf = _hf_model("gpt2", tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(path).items()}
    tensors["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))  # as in the original OpenAI upload
    save_file(tensors, path)
    ours = load_pretrained(tmp_path)
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        assert _max_diff(ours(ids).logits, hf(ids).logits) <= TOLERANCE


def test_tensors_the_config_has_no_place_for_are_refused(llama_folder):
    config = json.loads((llama_folder / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (llama_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"'model\.layers\.1\..*do not fit .*config\.json"):
        load_pretrained(llama_folder)


def test_sharded_checkpoint_written_by_transformers(tmp_path):
    config_cls, model_cls, kwargs = FAMILIES["mistral"]
    hf = model_cls(config_cls(**kwargs)).eval()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = load_pretrained(tmp_path)
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        assert _max_diff(ours(ids).logits, hf(ids).logits) <= TOLERANCE
