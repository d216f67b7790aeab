"""``lmforge sft ... peft.method=lora`` trains only the adapter in the one trainer and exports peft's folder;
``lmforge peft merge`` turns it into a plain Hugging Face model."""

import pytest
import torch
from peft import PeftModel

from lmforge.cli import main
from lmforge.config import ConfigError, load_config
from lmforge.model.hf import load_pretrained
from lmforge.tune.finetune import SFTConfig, run_sft
from lmforge.tune.peft import load_adapter, read_adapter_config

from .conftest import hf_model, sft_recipe


def test_sft_with_lora_trains_and_exports_only_the_adapter(tmp_path, chat_base):
    torch.set_num_threads(1)
    cfg = load_config(
        SFTConfig,
        data=sft_recipe(tmp_path, chat_base),
        overrides=["peft.method=lora", "peft.r=4", "peft.use_dora=true", "peft.target_modules=all-linear"],
    )
    result, _ = run_sft(cfg, progress=False)
    adapter = result.model_dir
    assert adapter == tmp_path / "sft" / "adapter"
    assert sorted(p.name for p in adapter.glob("adapter_*")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert (adapter / "tokenizer.json").is_file() and not (tmp_path / "sft" / "model").exists()
    peft_cfg, base_path = read_adapter_config(adapter)
    assert (peft_cfg.r, peft_cfg.use_dora, base_path) == (4, True, str(chat_base.resolve()))

    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(0))
    tuned = load_adapter(load_pretrained(chat_base), adapter, peft_cfg)
    with torch.no_grad():
        ours = tuned(ids).logits
        base = load_pretrained(chat_base)(ids).logits
        theirs = PeftModel.from_pretrained(hf_model(chat_base), adapter).eval()(input_ids=ids).logits
    assert (ours - base).abs().max() > 1e-3  # training moved the adapter
    assert (ours - theirs).abs().max() <= 1e-4  # peft reads the exported adapter as we do

    assert main(["peft", "merge", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        merged = hf_model(tmp_path / "merged")(input_ids=ids).logits
    assert (merged - ours).abs().max() <= 1e-4
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_peft_merge_names_a_missing_base(tmp_path, chat_base, capsys):
    from lmforge.tune.peft import PeftConfig, apply_peft, save_adapter

    model = apply_peft(load_pretrained(chat_base), PeftConfig(method="ia3"))
    save_adapter(model, tmp_path / "adapter", base_model="nowhere/model")
    assert main(["peft", "merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 2
    assert (
        "base_model_name_or_path 'nowhere/model' is not a model folder here; pass" in capsys.readouterr().err
    )
    assert (
        main(
            [
                "peft",
                "merge",
                str(tmp_path / "adapter"),
                "--base",
                str(chat_base),
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )


def test_a_bad_peft_block_is_a_config_error(tmp_path, chat_base):
    with pytest.raises(ConfigError, match=r"peft\.r: the rank must be a positive integer, got 0"):
        load_config(SFTConfig, data=sft_recipe(tmp_path, chat_base, method="lora", r=0))
    with pytest.raises(ConfigError, match=r"peft\.method: 'lokr' is not one of"):
        load_config(SFTConfig, data=sft_recipe(tmp_path, chat_base, method="lokr"))


def test_sft_with_qlora_trains_lora_on_nf4_weights_and_merges_into_them(tmp_path, chat_base):
    torch.set_num_threads(1)
    recipe = sft_recipe(tmp_path, chat_base, method="lora", r=4, quantize="nf4", target_modules="all-linear")
    result, _ = run_sft(load_config(SFTConfig, data=recipe), progress=False)
    peft_cfg, _ = read_adapter_config(result.model_dir)
    peft_cfg.quantize = "nf4"
    tuned = load_adapter(load_pretrained(chat_base), result.model_dir, peft_cfg)
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(0))
    argv = ["peft", "merge", str(result.model_dir), "--quantize", "nf4", "--out", str(tmp_path / "merged")]
    assert main(argv) == 0
    with torch.no_grad():
        ours = tuned(ids).logits
        merged = hf_model(tmp_path / "merged")(input_ids=ids).logits
    assert (merged - ours).abs().max() <= 1e-4
