"""The LoRA / QLoRA memory plan (lmforge.model.memory): trainable counts against peft, NF4 bytes against the
stored format, and the QLoRA paper's 65B-in-48GB claim."""

import json

import pytest
import torch
from torch import nn

from lmforge.cli import main
from lmforge.model.config import ModelConfig
from lmforge.model.flops import ParamCount, memory_plan
from lmforge.model.hf import config_from_hf
from lmforge.model.memory import nf4_bytes, peft_memory_plan
from lmforge.model.quant import NF4Weight

# LLaMA-65B as the QLoRA paper fine-tunes it
LLAMA_65B = ModelConfig(vocab_size=32000, d_model=8192, n_layers=80, n_heads=64, d_ff=22016, max_seq_len=2048)


def test_qlora_fits_a_65b_llama_in_48_gb():
    """QLoRA (Dettmers et al. 2023): LLaMA-65B fine-tunes on one 48 GB GPU (NF4 + double quantization, LoRA r=64
    on every linear layer, bf16 compute, gradient checkpointing, paged 32-bit AdamW), where 16-bit full
    fine-tuning needs more than 780 GB."""
    plan = peft_memory_plan(
        LLAMA_65B,
        "qlora",
        64,
        "all-linear",
        "bfloat16",
        micro_batch=1,
        context=512,
        activation_checkpointing=True,
    )
    assert plan.total < 48e9
    # what goes into it: 80 layers x 7 adapted projections, r * (in + out) each
    per_layer = 4 * 64 * (8192 + 8192) + 3 * 64 * (8192 + 22016)
    assert len(plan.targets) == 80 * 7 and plan.trainable == 80 * per_layer
    linear_weights = 80 * (4 * 8192 * 8192 + 3 * 8192 * 22016)
    assert plan.quantized == linear_weights
    # NF4: half a byte per weight, an 8-bit absmax per 64 and a float32 scale per 64 * 256 (the matrices divide evenly)
    nf4 = linear_weights * (0.5 + 1 / 64 + 4 / (64 * 256)) + 80 * 7 * 4
    rest = 2 * 32000 * 8192 + (2 * 80 + 1) * 8192  # embedding, head and norms in bf16
    assert plan.weights == pytest.approx(nf4 + 2 * rest + 2 * plan.trainable)
    assert plan.optimizer == 8 * plan.trainable and plan.gradients == 2 * plan.trainable
    # the 16-bit full fine-tune the paper compares with: weights, gradients and fp32 Adam states, 16 B a parameter
    assert memory_plan(LLAMA_65B, 1, 512, params=ParamCount(plan.frozen, 0, plan.frozen)).total > 780e9


def test_lora_plans_the_frozen_base_in_the_compute_dtype_and_states_for_adapters_only():
    cfg = ModelConfig(vocab_size=1000, d_model=256, n_layers=4, n_heads=8, d_ff=512, max_seq_len=256)
    bf16 = peft_memory_plan(cfg, "lora", 16, ["q_proj", "v_proj"], "bfloat16", context=128)
    fp32 = peft_memory_plan(cfg, "lora", 16, ["q_proj", "v_proj"], "float32", context=128)
    assert bf16.trainable == 4 * 2 * 16 * (256 + 256)
    assert bf16.weights == 2 * (bf16.frozen + bf16.trainable) and fp32.weights == 4 * (
        fp32.frozen + fp32.trainable
    )
    assert bf16.gradients == 2 * bf16.trainable and bf16.optimizer == fp32.optimizer == 8 * bf16.trainable
    assert bf16.workspace == 0 and bf16.quantized == 0
    qlora = peft_memory_plan(cfg, "qlora", 16, ["q_proj", "v_proj"], "bfloat16", context=128)
    # NF4 of a 256x256 matrix: 32768 code bytes + 1024 absmax bytes + 4 scales * 4 + offset 4; 256x512: twice
    nf4_per_layer = 4 * (32768 + 1024 + 16 + 4) + 3 * (65536 + 2048 + 32 + 4)
    rest = qlora.frozen - 4 * (4 * 256 * 256 + 3 * 256 * 512)
    assert qlora.weights == 4 * nf4_per_layer + 2 * rest + 2 * qlora.trainable
    assert qlora.workspace == 2 * 512 * 256  # the largest matrix dequantized to bf16


@pytest.mark.parametrize("numel", [64, 100, 64 * 256, 64 * 256 + 1, 300 * 77])
def test_nf4_bytes_are_the_bytes_nf4_weight_stores(numel):
    stored = NF4Weight(torch.randn(numel))
    assert nf4_bytes(numel) == sum(b.numel() * b.element_size() for b in stored.buffers())


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear", ["k_proj", "down_proj"]])
def test_trainable_parameters_equal_peft_on_a_tiny_hf_llama(targets):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    hf_config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # k/v projections narrower than q
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = peft.get_peft_model(
        transformers.LlamaForCausalLM(hf_config), peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets)
    )
    trainable, total = model.get_nb_trainable_parameters()
    plan = peft_memory_plan(config_from_hf(hf_config.to_dict()), "lora", 16, targets)
    assert plan.trainable == trainable
    assert plan.frozen == total - trainable
    adapted = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert len(plan.targets) == len({n.rsplit(".lora_", 1)[0] for n in adapted})


def test_bad_options_are_refused_naming_them():
    cfg = ModelConfig(vocab_size=100, d_model=32, n_layers=1, n_heads=2, max_seq_len=64)
    with pytest.raises(ValueError, match="r: the rank must be a positive integer, got 0"):
        peft_memory_plan(cfg, "lora", 0)
    with pytest.raises(ValueError, match=r"target_modules: \['qkv'\] match no linear layer .*q_proj"):
        peft_memory_plan(cfg, "lora", 4, ["qkv"])
    with pytest.raises(ValueError, match="method: 'ia3' is not one of lora, qlora"):
        peft_memory_plan(cfg, "ia3", 4)
    with pytest.raises(ValueError, match="compute_dtype: 'int8'"):
        peft_memory_plan(cfg, "lora", 4, compute_dtype="int8")


def test_info_reports_the_lora_and_qlora_plans(capsys):
    args = ["info", "tiny-llama", "--seq-len", "64", "--json"]
    assert main([*args, "--peft", "lora", "--r", "16"]) == 0
    lora = json.loads(capsys.readouterr().out)["peft"]
    assert main([*args, "--qlora", "--r", "16"]) == 0
    qlora = json.loads(capsys.readouterr().out)["peft"]
    assert lora["method"] == "lora" and qlora["method"] == "qlora"
    assert lora["trainable_parameters"] == qlora["trainable_parameters"] > 0
    assert qlora["memory_per_gpu_bytes"]["weights"] < lora["memory_per_gpu_bytes"]["weights"]
    assert qlora["nf4_parameters"] > 0 and lora["nf4_parameters"] == 0
    assert main(["info", "tiny-llama", "--qlora", "--r", "4"]) == 0  # the table
    assert "QLoRA (NF4 base) r=4" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["info", "tiny-llama", "--peft", "lora", "--r", "0"])
    assert "--r: the rank must be a positive integer" in capsys.readouterr().err


def test_all_linear_adapts_every_block_linear_not_the_head():
    cfg = ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=2, max_seq_len=64)
    plan = peft_memory_plan(cfg, "lora", 2, "all-linear")
    with torch.device("meta"):
        from lmforge.model.transformer import Transformer

        model = Transformer(cfg)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(plan.targets) == sorted(n for n in linears if n != "lm_head")
