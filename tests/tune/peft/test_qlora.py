"""NF4 with double quantization against the published code values and error bounds; LoRA on NF4 (QLoRA)."""

import pytest
import torch
from peft import PeftModel

from lmforge.model.hf import load_pretrained, save_pretrained
from lmforge.tune.peft import (
    PeftConfig,
    apply_peft,
    load_adapter,
    merge_adapter,
    read_adapter_config,
    save_adapter,
)
from lmforge.tune.peft.nf4 import BLOCK, NF4_CODES, NF4Linear, NF4Weight

from .conftest import hf_model, randomize_trainable


def test_the_nf4_codes_are_the_normal_quantiles_of_the_qlora_paper():
    # Dettmers et al. 2023: 8 positive and 7 negative quantiles of N(0, 1) (offset 0.9677), 0, scaled to [-1, 1]
    normal = torch.distributions.Normal(0.0, 1.0)
    offset = 0.9677083
    positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64))[:-1]
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64))[:-1]
    codes = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    codes = codes / codes.abs().max()
    assert NF4_CODES.tolist()[:3] == [-1.0, -0.6961928009986877, -0.5250730514526367]
    assert NF4_CODES[7] == 0 and NF4_CODES[15] == 1.0 and len(NF4_CODES) == 16
    assert torch.allclose(NF4_CODES.double(), codes, atol=1e-6)


def test_code_values_round_trip_exactly_up_to_the_absmax_constant():
    torch.manual_seed(0)
    index = torch.randint(0, 16, (8, BLOCK))
    index[:, 0] = 15  # every block's absmax is the code 1.0
    scales = torch.rand(8, 1) + 0.5
    weight = NF4_CODES[index] * scales
    quantized = NF4Weight(weight)
    restored = quantized.dequantize()
    # the same codes come back; only the 8-bit absmax constant is approximate
    assert torch.equal(
        torch.stack([quantized.packed >> 4, quantized.packed & 0xF], 1).view(8, BLOCK), index.to(torch.uint8)
    )
    assert torch.allclose(restored / quantized.absmax()[:, None], NF4_CODES[index], atol=1e-6)


@pytest.mark.parametrize("shape", [(48, 32), (96, 40), (7, 9)])  # the last two pad their final block
def test_round_trip_error_is_within_the_nf4_and_double_quantization_bounds(shape):
    torch.manual_seed(1)
    weight = torch.randn(shape) * 0.02
    quantized = NF4Weight(weight)
    restored = quantized.dequantize()
    assert restored.shape == weight.shape and quantized.packed.dtype == torch.uint8
    flat = torch.nn.functional.pad(weight.reshape(-1), (0, -weight.numel() % BLOCK)).view(-1, BLOCK)
    true_absmax = flat.abs().amax(dim=1)
    # double quantization: 8-bit symmetric codes, error at most half a step of the absmax block's scale
    absmax_error = (quantized.absmax() - true_absmax).abs()
    assert (absmax_error <= quantized.absmax_scale.max() / 2 + 1e-9).all()
    # NF4: within half the widest gap between neighbouring codes, of the block's absmax, plus the absmax error
    half_gap = (NF4_CODES[1:] - NF4_CODES[:-1]).max() / 2
    error = torch.nn.functional.pad((restored - weight).reshape(-1), (0, -weight.numel() % BLOCK)).view(
        -1, BLOCK
    )
    bound = half_gap * true_absmax + absmax_error + 1e-7
    assert (error.abs() <= bound[:, None]).all()
    assert (restored - weight).norm() / weight.norm() < 0.12  # ~0.09 for Gaussian weights


def test_nf4_linear_computes_with_the_dequantized_weight_in_the_compute_dtype():
    torch.manual_seed(2)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(3, 64)
    for dtype in (torch.float32, torch.bfloat16):
        layer = NF4Linear(linear, compute_dtype=dtype)
        assert layer.weight.dtype == dtype
        expected = torch.nn.functional.linear(x.to(dtype), layer.weight, layer.bias)
        assert torch.equal(layer(x.to(dtype)), expected)
    assert [p.requires_grad for p in NF4Linear(linear).parameters()] == [False]  # the bias only


@pytest.mark.parametrize("use_dora", [False, True])
def test_qlora_fresh_merged_and_peft_parity(llama_dir, tmp_path, input_ids, use_dora):
    cfg = PeftConfig(
        method="lora",
        r=4,
        target_modules=["q_proj", "v_proj", "down_proj"],
        use_dora=use_dora,
        quantize="nf4",
    )
    model = apply_peft(load_pretrained(llama_dir), cfg)
    assert isinstance(model.blocks["0"].attn.k_proj, NF4Linear)  # untargeted layers are quantized too
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "lora_" in n
    }
    # a fresh adapter leaves the quantized model's output unchanged
    quantized_base = merge_adapter(apply_peft(load_pretrained(llama_dir), cfg))
    with torch.no_grad():
        assert torch.allclose(model(input_ids).logits, quantized_base(input_ids).logits, atol=1e-6)
    randomize_trainable(model)
    save_adapter(model, tmp_path / "adapter", str(llama_dir))
    with torch.no_grad():
        ours = model(input_ids).logits
        merged = merge_adapter(model)
        assert not any(isinstance(m, NF4Linear) for m in merged.modules())
        assert (merged(input_ids).logits - ours).abs().max() <= 1e-5
    # the adapter is plain LoRA: peft applies it to the dequantized base with the same logits
    save_pretrained(quantized_base, tmp_path / "dequantized")
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(hf_model(tmp_path / "dequantized"), tmp_path / "adapter")(
            input_ids=input_ids
        ).logits
    assert (theirs - ours).abs().max() <= 1e-4
    loaded_cfg, _ = read_adapter_config(tmp_path / "adapter")
    loaded_cfg.quantize = "nf4"
    reloaded = load_adapter(load_pretrained(llama_dir), tmp_path / "adapter", loaded_cfg)
    with torch.no_grad():
        assert (reloaded(input_ids).logits - ours).abs().max() <= 1e-5


def test_quantization_goes_with_lora_only():
    with pytest.raises(ValueError, match=r"peft\.quantize: NF4 base weights \(QLoRA\) go with method=lora"):
        PeftConfig(method="ia3", quantize="nf4")
