import pytest

from lmforge.config import ConfigError, load_config
from lmforge.model.config import ModelConfig


def test_defaults_fill_derived_fields():
    cfg = ModelConfig(d_model=64, n_heads=8, n_kv_heads=None, mlp="gelu")
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.d_ff) == (8, 8, 256)
    assert cfg.rotary_dim == 8
    assert ModelConfig(d_model=64, n_heads=8, rotary_pct=0.25).rotary_dim == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_kv_heads": 3}, "n_kv_heads"),
        ({"attention": "sliding"}, "sliding_window"),
        ({"rope_scaling": {"rope_type": "ntk-by-parts", "factor": 2.0}}, "rope_type"),
        ({"rope_scaling": {"rope_type": "dynamic"}}, "rope_scaling.factor"),
        (
            {"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}},
            "short_factor",
        ),
        ({"n_experts": 2, "moe_top_k": 3}, "moe_top_k"),
        ({"moe_capacity_factor": 0.0}, "moe_capacity_factor"),
        ({"position": "absolute"}, "position"),
    ],
)
def test_invalid_choices_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(d_model=64, n_heads=8, **overrides)


def test_loads_from_dotted_overrides_with_a_scaling_dict():
    cfg = load_config(
        ModelConfig,
        data={"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
        overrides=["n_layers=3", "n_kv_heads=2"],
    )
    assert (cfg.n_layers, cfg.n_kv_heads, cfg.rope_scaling["rope_type"]) == (3, 2, "llama3")
    with pytest.raises(ConfigError, match="n_layerz"):
        load_config(ModelConfig, overrides=["n_layerz=3"])
