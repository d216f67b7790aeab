"""Export to GGUF, the single-file format of llama.cpp, Ollama and LM Studio.

The model is first put in its Hugging Face layout (:func:`lmforge.model.hf.hf_state_dict`), then renamed with
the tensor-name map of llama.cpp's own ``gguf`` package, as llama.cpp's ``convert_hf_to_gguf.py`` does:

- Llama, Mistral and Mixtral become the ``llama`` architecture. llama.cpp rotates interleaved pairs
  (``x[2i], x[2i+1]``) where Hugging Face rotates halves (``x[i], x[i + d/2]``), so the rows of ``q_proj``
  and ``k_proj`` are permuted per head to match; Mixtral's experts are stacked into ``ffn_*_exps``;
- Qwen2 becomes ``qwen2`` (llama.cpp rotates halves there, no permutation);
- GPT-2 becomes ``gpt2`` (fused ``attn_qkv``; the Conv1D weights transposed back to ``(out, in)``).

The tokenizer goes into the metadata the way the converter writes a byte-level BPE: ``tokenizer.ggml.model =
gpt2``, the token strings by id with their types (special tokens are control tokens), the merges, the
pre-tokenizer name llama.cpp knows for the split regex, the special token ids, ``add_bos_token`` and the
chat template.

Quantization (``--quant``): ``f32``; ``f16``, ``q8_0`` and ``q4_0`` for the weight matrices, with 1-d
tensors (norms, biases) and the MoE router kept in f32, as llama.cpp's converter does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from lmforge.model.hf import ModelLoadError, hf_family, hf_state_dict
from lmforge.model.transformer import Transformer

if TYPE_CHECKING:
    from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

QUANTS = ("f32", "f16", "q8_0", "q4_0")
_ARCH = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}

# llama.cpp names its pre-tokenizers; these are the split regexes each name stands for.
_PRE_TOKENIZERS = {
    "llama-bpe": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
    "qwen2": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
}


class GGUFExportError(ValueError):
    """A model or tokenizer that GGUF (as llama.cpp reads it) cannot represent."""


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError as err:
        raise ImportError("GGUF export needs the gguf package: pip install 'lmforge[export]'") from err
    return gguf


def permute_for_ggml(weight: Tensor, n_heads: int) -> Tensor:
    """Rows of a q/k projection from rotate-half order (per head: first halves, then second halves of the
    rotated pairs) to llama.cpp's interleaved order (pair by pair)."""
    rows = weight.shape[0]
    head_dim = rows // n_heads
    return weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _check_model(model: Transformer) -> str:
    cfg = model.cfg
    family = hf_family(cfg)
    if family is None:
        raise GGUFExportError(
            "this model maps onto no Hugging Face family (Llama, Mistral, Qwen2, GPT-2, Mixtral)"
        )
    if family == "mamba":
        raise GGUFExportError("Mamba models are not exported to GGUF (only attention families are)")
    if cfg.attention == "sliding":
        raise GGUFExportError(
            "llama.cpp's llama architecture has no sliding-window attention (attention=sliding)"
        )
    if cfg.rope_scaling and cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type")) != "linear":
        raise GGUFExportError(f"rope_scaling {cfg.rope_scaling} is not exported to GGUF (only linear is)")
    return family


def _pre_tokenizer_name(tok: Tokenizer) -> str:
    """llama.cpp's name for the tokenizer's split (GGUF ``tokenizer.ggml.pre``)."""
    pre = json.loads(tok.backend.to_str()).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    patterns = [p["pattern"].get("Regex") for p in parts if p.get("type") == "Split"]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if not patterns and byte_level and byte_level[0].get("use_regex", True):
        return "gpt-2"
    for name, regex in _PRE_TOKENIZERS.items():
        if patterns == [regex]:
            return name
    raise GGUFExportError(
        "the tokenizer's pre-tokenizer has no llama.cpp equivalent (known: GPT-2 byte-level, the Llama 3 / "
        f"GPT-4 split, Qwen2's split); found {parts}"
    )


def _tokenizer_metadata(writer: Any, gguf: Any, tok: Tokenizer, vocab_size: int) -> None:
    backend = json.loads(tok.backend.to_str())
    model = backend.get("model", {})
    if model.get("type") != "BPE" or not any(
        p.get("type") == "ByteLevel"
        for p in [backend.get("decoder") or {}, *[backend.get("pre_tokenizer") or {}]]
    ):
        raise GGUFExportError("only byte-level BPE tokenizers are exported to GGUF (tokenizer kind byte_bpe)")
    by_id = {i: t for t, i in tok.backend.get_vocab(with_added_tokens=True).items()}
    if len(by_id) > vocab_size:
        raise GGUFExportError(
            f"the tokenizer has {len(by_id)} tokens but the model only {vocab_size} embeddings"
        )
    added = tok.backend.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows beyond the tokenizer (padded vocabulary)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tok))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id)):
        token_id = getattr(tok, f"{name}_id")
        if token_id is not None:
            add(token_id)
    if tok.pad_id is not None:
        writer.add_pad_token_id(tok.pad_id)
    writer.add_add_bos_token(bool(tok.add_bos_token))
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def _hyper_parameters(writer: Any, model: Transformer, arch: str, name: str) -> None:
    cfg = model.cfg
    writer.add_name(name)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.n_heads)
    writer.add_vocab_size(cfg.vocab_size)
    if arch == "gpt2":
        writer.add_layer_norm_eps(cfg.norm_eps)
        return
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    if cfg.rope_scaling:
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    if cfg.n_experts:
        writer.add_expert_count(cfg.n_experts)
        writer.add_expert_used_count(cfg.moe_top_k)


def gguf_tensors(model: Transformer, family: str) -> dict[str, Tensor]:
    """The model's tensors under their GGUF names (fp32, permuted and stacked as llama.cpp expects)."""
    gguf = _import_gguf()
    cfg = model.cfg
    arch = _ARCH[family]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.n_layers)
    state = {k: v.detach().float().cpu() for k, v in hf_state_dict(model, family).items()}
    out: dict[str, Tensor] = {}
    experts: dict[tuple[int, str], dict[int, Tensor]] = {}
    for key, tensor in state.items():
        if ".block_sparse_moe.experts." in key:  # model.layers.L.block_sparse_moe.experts.E.w1.weight
            parts = key.split(".")
            experts.setdefault((int(parts[2]), parts[6]), {})[int(parts[5])] = tensor
            continue
        if (
            family == "gpt2"
            and key.endswith(".weight")
            and any(s in key for s in ("c_attn", "c_proj", "c_fc"))
        ):
            tensor = tensor.t().contiguous()  # Conv1D stores (in, out)
        if arch == "llama" and key.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = permute_for_ggml(tensor, cfg.n_heads)
        elif arch == "llama" and key.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = permute_for_ggml(tensor, cfg.n_kv_heads)
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFExportError(f"no GGUF name for tensor {key} ({arch})")
        out[name] = tensor  # the map keeps the .weight / .bias suffix
    for (layer, which), by_expert in sorted(experts.items()):
        gguf_name = {"w1": "ffn_gate_exps", "w2": "ffn_down_exps", "w3": "ffn_up_exps"}[which]
        out[f"blk.{layer}.{gguf_name}.weight"] = torch.stack([by_expert[e] for e in sorted(by_expert)])
    if cfg.tie_embeddings:
        out.pop("output.weight", None)  # llama.cpp falls back to token_embd
    return out


def _encode(gguf: Any, name: str, tensor: Tensor, quant: str) -> tuple[np.ndarray, Any]:
    """(data, GGML type) of one tensor; 1-d tensors and the MoE router stay in f32."""
    array = tensor.numpy()
    keep_f32 = quant == "f32" or array.ndim == 1 or name.endswith("ffn_gate_inp.weight")
    if keep_f32:
        return array.astype(np.float32), gguf.GGMLQuantizationType.F32
    if quant == "f16":
        return array.astype(np.float16), gguf.GGMLQuantizationType.F16
    qtype = gguf.GGMLQuantizationType.Q8_0 if quant == "q8_0" else gguf.GGMLQuantizationType.Q4_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:  # rows that do not fill whole blocks cannot be quantized
        return array.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


def export_gguf(
    model: Transformer, tokenizer: Tokenizer, path: str | Path, quant: str = "f16", name: str = "lmforge"
) -> Path:
    """Write ``model`` and ``tokenizer`` to one GGUF file at ``path``."""
    gguf = _import_gguf()
    if quant not in QUANTS:
        raise GGUFExportError(f"quant: {quant!r} is not one of {', '.join(QUANTS)}")
    family = _check_model(model)
    arch = _ARCH[family]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[quant]
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        _hyper_parameters(writer, model, arch, name)
        writer.add_file_type(file_type)
        _tokenizer_metadata(writer, gguf, tokenizer, model.cfg.vocab_size)
        for tensor_name, tensor in gguf_tensors(model, family).items():
            data, qtype = _encode(gguf, tensor_name, tensor, quant)
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
    finally:
        writer.close()
    tmp.replace(path)
    return path


def export_gguf_folder(model_dir: str | Path, out: str | Path, quant: str = "f16") -> Path:
    """Export a model folder (lmforge or Hugging Face layout, with its tokenizer) to a GGUF file."""
    from lmforge.model.hf import load_pretrained
    from lmforge.tokenizer import load_tokenizer

    model_dir = Path(model_dir)
    try:
        tok = load_tokenizer(model_dir)
    except FileNotFoundError as err:
        raise ModelLoadError(
            f"{model_dir}: GGUF export needs the tokenizer in the model folder ({err})"
        ) from err
    model = load_pretrained(model_dir, dtype=torch.float32)
    return export_gguf(model.eval(), tok, out, quant=quant, name=model_dir.name)
