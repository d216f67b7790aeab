"""Fresh adapters change nothing; merging changes no logits; bad adapters fail with one clear error."""

import json

import pytest
import torch

from lmforge.model.hf import load_pretrained, save_pretrained
from lmforge.tune.peft import (
    AdapterConfigError,
    PeftConfig,
    adapter_layers,
    apply_peft,
    load_adapter,
    merge_adapter,
    read_adapter_config,
    save_adapter,
)

from .conftest import build_base, hf_model, randomize_trainable

METHODS = {
    "lora": PeftConfig(method="lora", r=4, lora_alpha=8, target_modules="all-linear"),
    "lora-embedding": PeftConfig(
        method="lora", r=4, target_modules=["embed_tokens", "q_proj"], use_rslora=True
    ),
    "dora": PeftConfig(method="lora", r=4, lora_alpha=8, use_dora=True, target_modules="all-linear"),
    "ia3": PeftConfig(method="ia3"),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_fresh_adapter_leaves_the_base_output_unchanged(name, base_dir, input_ids):
    base = load_pretrained(base_dir)
    with torch.no_grad():
        expected = base(input_ids).logits
        model = apply_peft(load_pretrained(base_dir), METHODS[name])
        assert torch.allclose(model(input_ids).logits, expected, atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n or "ia3_l" in n) for n in trainable)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_merged_equals_unmerged_and_unmerge_restores_the_base(name, base_dir, input_ids):
    model = apply_peft(load_pretrained(base_dir), METHODS[name])
    randomize_trainable(model)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        unmerged = model(input_ids).logits
        for layer in adapter_layers(model):
            layer.merge()
        assert torch.allclose(model(input_ids).logits, unmerged, atol=1e-5)
        for layer in adapter_layers(model):
            layer.unmerge()
        for key, value in model.state_dict().items():
            assert torch.allclose(value, base_state[key], atol=1e-6), key
        merged = merge_adapter(model)
        assert not adapter_layers(merged)
        assert torch.allclose(merged(input_ids).logits, unmerged, atol=1e-5)


def test_a_merged_model_is_a_plain_hugging_face_model(llama_dir, tmp_path, input_ids):
    cfg = PeftConfig(method="lora", r=4, target_modules="all-linear", modules_to_save=["lm_head"])
    model = apply_peft(load_pretrained(llama_dir), cfg)
    randomize_trainable(model)
    with torch.no_grad():
        expected = model(input_ids).logits
    save_pretrained(merge_adapter(model), tmp_path / "merged")
    with torch.no_grad():
        got = hf_model(tmp_path / "merged")(input_ids=input_ids).logits
    assert (got - expected).abs().max() <= 1e-4


def test_a_head_tied_to_the_embedding_is_untied_when_trained(base_dir, tmp_path, input_ids):
    model = apply_peft(load_pretrained(base_dir), PeftConfig(method="lora", modules_to_save=["lm_head"]))
    randomize_trainable(model)
    assert model.lm_head.weight is not model.embed_tokens.weight
    with torch.no_grad():
        expected = model(input_ids).logits
    save_pretrained(merge_adapter(model), tmp_path / "merged")
    with torch.no_grad():
        assert torch.allclose(load_pretrained(tmp_path / "merged")(input_ids).logits, expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------ bad input


def _write_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.fixture()
def adapter_dir(llama_dir, tmp_path):
    model = apply_peft(load_pretrained(llama_dir), PeftConfig(method="lora", r=4))
    return save_adapter(model, tmp_path / "adapter", str(llama_dir))


def test_an_adapter_for_a_different_base_names_the_tensor(adapter_dir, tmp_path):
    other = build_base(tmp_path / "other", "llama")
    config = json.loads((other / "config.json").read_text())
    config["hidden_size"], config["head_dim"] = 64, 8
    (other / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    import transformers

    transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).save_pretrained(other)
    cfg, _ = read_adapter_config(adapter_dir)
    with pytest.raises(
        AdapterConfigError,
        match=r"adapter_model\.safetensors: tensor 'base_model\.model\.model"
        r"\.layers\.0\.self_attn\.q_proj\.lora_A\.weight' has shape \(4, 32\).*\(4, 64\)",
    ):
        load_adapter(load_pretrained(other), adapter_dir, cfg)


def test_a_target_that_matches_nothing_lists_the_modules(llama_dir):
    with pytest.raises(
        AdapterConfigError,
        match=r"target_modules: \['qkv'\] matches no module; the model has "
        r"down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj",
    ):
        apply_peft(load_pretrained(llama_dir), PeftConfig(method="lora", target_modules=["qkv"]))


@pytest.mark.parametrize("r", [0, -2])
def test_a_rank_below_one_is_refused(adapter_dir, r):
    with pytest.raises(ValueError, match=rf"peft\.r: the rank must be a positive integer, got {r}"):
        PeftConfig(method="lora", r=r)
    _write_config(adapter_dir, r=r)
    with pytest.raises(AdapterConfigError, match=rf"adapter_config\.json: r: .*positive integer, got {r}"):
        read_adapter_config(adapter_dir)


def test_an_unknown_peft_type_is_refused(adapter_dir):
    _write_config(adapter_dir, peft_type="LOHA")
    with pytest.raises(AdapterConfigError, match=r"adapter_config\.json: peft_type 'LOHA' is not supported"):
        read_adapter_config(adapter_dir)


def test_an_option_we_do_not_implement_is_refused_not_ignored(adapter_dir):
    _write_config(adapter_dir, layers_to_transform=[0])
    with pytest.raises(
        AdapterConfigError, match=r"adapter_config\.json: layers_to_transform=\[0\] is not supported"
    ):
        read_adapter_config(adapter_dir)


def test_a_missing_adapter_tensor_is_named(adapter_dir, llama_dir):
    from safetensors.torch import load_file, save_file

    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")
    save_file(tensors, path)
    cfg, _ = read_adapter_config(adapter_dir)
    with pytest.raises(
        AdapterConfigError,
        match=r"tensor 'base_model\.model\.model\.layers\.1\.self_attn\.v_proj"
        r"\.lora_B\.weight' is missing",
    ):
        load_adapter(load_pretrained(llama_dir), adapter_dir, cfg)


def test_trainable_tokens_train_and_save_only_their_rows(base_dir, tmp_path, input_ids):
    """New tokens after a vocabulary resize: only their embedding (and head) rows train and are saved."""
    from safetensors.torch import load_file

    new_ids = [92, 93, 94, 95]
    cfg = PeftConfig(method="lora", r=2, target_modules=["q_proj"], trainable_token_indices=new_ids)
    base = load_pretrained(base_dir)
    model = apply_peft(load_pretrained(base_dir), cfg)
    with torch.no_grad():
        assert torch.allclose(model(input_ids).logits, base(input_ids).logits, atol=1e-6)  # fresh: no change
    randomize_trainable(model)
    save_adapter(model, tmp_path / "adapter", str(base_dir))
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    rows = {k: tuple(v.shape) for k, v in tensors.items() if "token_adapter" in k}
    d_model = base.cfg.d_model
    expected = {"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": (4, d_model)}
    assert rows == expected  # a tied head shares the embedding's rows (saved once); an untied one has none
    ids_with_new = torch.tensor([[1, 92, 5, 95, 94, 2]])
    with torch.no_grad():
        trained = model(ids_with_new).logits
        loaded_cfg, _ = read_adapter_config(tmp_path / "adapter")
        assert loaded_cfg.trainable_token_indices == {"embed_tokens": new_ids}
        loaded = load_adapter(load_pretrained(base_dir), tmp_path / "adapter", loaded_cfg)
        assert torch.allclose(loaded(ids_with_new).logits, trained, atol=1e-6)
        merged = merge_adapter(model)
        assert torch.allclose(merged(ids_with_new).logits, trained, atol=1e-5)
        old_rows = [i for i in range(base.cfg.vocab_size) if i not in new_ids]
        assert torch.equal(merged.embed_tokens.weight[old_rows], base.embed_tokens.weight[old_rows])
        assert not torch.equal(merged.embed_tokens.weight[new_ids], base.embed_tokens.weight[new_ids])


def test_trainable_token_ids_beyond_the_vocabulary_are_named(llama_dir):
    cfg = PeftConfig(method="lora", trainable_token_indices={"lm_head": [5, 96]})
    with pytest.raises(AdapterConfigError, match=r"trainable_token_indices\.lm_head: token id 96 is beyond"):
        apply_peft(load_pretrained(llama_dir), cfg)
    with pytest.raises(ValueError, match="not the embedding"):
        PeftConfig(method="lora", trainable_token_indices={"q_proj": [1]})
    with pytest.raises(ValueError, match="method=lora"):
        PeftConfig(method="ia3", trainable_token_indices=[1])
