"""GGUF export: every tensor and key read back with llama.cpp's own reader (the ``gguf`` package), and, where
llama-cpp-python is installed, llama.cpp's logits on the exported file against ours."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from lmforge.model.gguf import (
    GGUFExportError,
    export_gguf,
    export_gguf_folder,
    gguf_tensors,
    permute_for_ggml,
)
from lmforge.model.hf import config_from_hf, hf_state_dict
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import Tokenizer, TokenizerTrainConfig, train_tokenizer

gguf = pytest.importorskip("gguf")

VOCAB = 320
LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)
HF_CONFIGS = {
    "llama": transformers.LlamaConfig(**LLAMA_LIKE),
    "qwen2": transformers.Qwen2Config(**LLAMA_LIKE, tie_word_embeddings=True),
    "gpt2": transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0
    ),
    "mixtral": transformers.MixtralConfig(**LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2),
}
TEXTS = ["The quick brown fox jumps over the lazy dog. 12345 apples!", "def f(x):\n    return x * 2\n"] * 20


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer(TEXTS, TokenizerTrainConfig(vocab_size=VOCAB, min_frequency=1))


def build(family: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(config_from_hf(HF_CONFIGS[family].to_dict()))
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms and biases, so a misplaced tensor shows
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def field_value(reader, key: str):
    field = reader.get_field(key)
    assert field is not None, f"missing key {key}"
    return field.contents()


def read_tensors(reader) -> dict[str, np.ndarray]:
    out = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = np.asarray(data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
    return out


def test_permutation_turns_rotate_half_into_interleaved_rope() -> None:
    """A q projection's output rotated by halves (Hugging Face) equals the permuted projection's output
    rotated pair by pair (llama.cpp), up to the same permutation of the result."""
    n_heads, head_dim, d = 2, 8, 16
    w = torch.randn(n_heads * head_dim, d)
    x = torch.randn(d)
    theta = 0.37 * torch.arange(head_dim // 2)
    cos, sin = torch.cos(theta), torch.sin(theta)

    def rotate_half(v: torch.Tensor) -> torch.Tensor:
        a, b = v[: head_dim // 2], v[head_dim // 2 :]
        return torch.cat([a * cos - b * sin, b * cos + a * sin])

    def rotate_pairs(v: torch.Tensor) -> torch.Tensor:
        a, b = v[0::2], v[1::2]
        return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=1).reshape(-1)

    hf = torch.cat([rotate_half(h) for h in (w @ x).split(head_dim)])
    ggml = torch.cat([rotate_pairs(h) for h in (permute_for_ggml(w, n_heads) @ x).split(head_dim)])
    torch.testing.assert_close(permute_for_ggml(hf[:, None], n_heads)[:, 0], ggml)


@pytest.mark.parametrize("family", sorted(HF_CONFIGS))
def test_every_tensor_and_key_reads_back(family: str, tokenizer: Tokenizer, tmp_path) -> None:
    model = build(family)
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", quant="f32", name="tiny")
    reader = gguf.GGUFReader(str(path))
    arch = {"llama": "llama", "mixtral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}[family]
    assert field_value(reader, "general.architecture") == arch
    assert field_value(reader, f"{arch}.block_count") == 2
    assert field_value(reader, f"{arch}.embedding_length") == 64
    assert field_value(reader, f"{arch}.attention.head_count") == 4
    if arch != "gpt2":
        assert field_value(reader, f"{arch}.attention.head_count_kv") == 2
        assert field_value(reader, f"{arch}.rope.freq_base") == pytest.approx(10000.0)
    if family == "mixtral":
        assert field_value(reader, "llama.expert_count") == 4
        assert field_value(reader, "llama.expert_used_count") == 2
    # tokenizer: every token by id, special tokens as control tokens, the merges, the split, the template
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == VOCAB and all(tokens[i] == t for t, i in vocab.items())
    types = field_value(reader, "tokenizer.ggml.token_type")
    assert types[tokenizer.eos_id] == gguf.TokenType.CONTROL and types[vocab["a"]] == gguf.TokenType.NORMAL
    assert field_value(reader, "tokenizer.ggml.model") == "gpt2"
    assert field_value(reader, "tokenizer.ggml.pre") == "llama-bpe"
    merges = json.loads(tokenizer.backend.to_str())["model"]["merges"]
    assert field_value(reader, "tokenizer.ggml.merges") == [
        m if isinstance(m, str) else " ".join(m) for m in merges
    ]
    assert field_value(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_id
    assert field_value(reader, "tokenizer.chat_template") == tokenizer.chat_template
    # tensors: what the file holds, un-permuted, equals the model's Hugging Face tensors
    got = read_tensors(reader)
    want = gguf_tensors(model, family)
    assert set(got) == set(want)
    hf = hf_state_dict(model, family)
    for name, array in got.items():
        np.testing.assert_array_equal(array, want[name].numpy(), err_msg=name)
    if family == "llama":
        q = torch.from_numpy(got["blk.0.attn_q.weight"].copy())
        inverse = q.reshape(4, 16 // 2, 2, 64).swapaxes(1, 2).reshape(64, 64)
        torch.testing.assert_close(inverse, hf["model.layers.0.self_attn.q_proj.weight"])
    if family == "mixtral":
        assert got["blk.1.ffn_gate_exps.weight"].shape == (4, 96, 64)
        np.testing.assert_array_equal(
            got["blk.1.ffn_down_exps.weight"][3],
            hf["model.layers.1.block_sparse_moe.experts.3.w2.weight"].numpy(),
        )
    if family == "gpt2":
        np.testing.assert_array_equal(
            got["blk.0.attn_qkv.weight"], hf["transformer.h.0.attn.c_attn.weight"].t().numpy()
        )
    if family == "qwen2":
        assert "output.weight" not in got  # tied: llama.cpp reads token_embd
        assert "blk.0.attn_q.bias" in got


@pytest.mark.parametrize(("quant", "tolerance"), [("f16", 1e-3), ("q8_0", 1.5e-2), ("q4_0", 0.3)])
def test_quantized_weights_stay_close_and_norms_stay_f32(quant: str, tolerance: float, tokenizer, tmp_path):
    model = build("llama")
    reader = gguf.GGUFReader(str(export_gguf(model, tokenizer, tmp_path / "q.gguf", quant=quant)))
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.attn_q.weight"].name == quant.upper()
    got, want = read_tensors(reader), gguf_tensors(model, "llama")
    for name, array in got.items():
        ref = want[name].numpy()
        # error relative to each row's largest weight: the block scale is the block's absmax
        err = np.abs(array - ref).max() / np.abs(ref).max()
        assert err <= tolerance, (name, err)


def test_what_gguf_cannot_hold_is_refused_clearly(tokenizer, tmp_path) -> None:
    mistral = Transformer(
        config_from_hf(transformers.MistralConfig(**LLAMA_LIKE, sliding_window=8).to_dict())
    )
    with pytest.raises(GGUFExportError, match="sliding"):
        export_gguf(mistral, tokenizer, tmp_path / "m.gguf")
    wordpiece = train_tokenizer(
        TEXTS, TokenizerTrainConfig(kind="wordpiece", vocab_size=200, min_frequency=1)
    )
    with pytest.raises(GGUFExportError, match="byte-level BPE"):
        export_gguf(build("llama"), wordpiece, tmp_path / "w.gguf")
    with pytest.raises(GGUFExportError, match="quant"):
        export_gguf(build("llama"), tokenizer, tmp_path / "x.gguf", quant="q3_k")
    assert not list(tmp_path.glob("*.gguf*"))  # nothing half-written


@pytest.mark.parametrize("family", sorted(HF_CONFIGS))
def test_llama_cpp_gives_our_logits(family: str, tokenizer, tmp_path) -> None:
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (it builds llama.cpp)"
    )
    model = build(family)
    from lmforge.model.hf import save_pretrained

    folder = tmp_path / "model"
    save_pretrained(model, folder)
    tokenizer.save(folder)
    path = export_gguf_folder(folder, tmp_path / "m.gguf", quant="f32")
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    prompt = "The quick brown fox"
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    assert llm.tokenize(prompt.encode(), add_bos=True, special=False) == ids
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(theirs, ours, atol=2e-3, rtol=0)


def test_the_command_exports_a_model_folder(tokenizer, tmp_path, capsys) -> None:
    from lmforge.cli import main
    from lmforge.model.hf import save_pretrained

    folder = tmp_path / "model"
    save_pretrained(build("qwen2"), folder)
    assert main(["export", "gguf", str(folder), "--out", str(tmp_path / "m.gguf")]) == 1  # no tokenizer yet
    assert "needs the tokenizer" in capsys.readouterr().out
    tokenizer.save(folder)
    assert main(["export", "gguf", str(folder), "--out", str(tmp_path / "m.gguf"), "--quant", "q8_0"]) == 0
    assert "q8_0" in capsys.readouterr().out
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert field_value(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
