from dataclasses import dataclass, field

import pytest

from lmforge.config import ConfigError, load_config, save_config
from lmforge.model.config import ModelConfig


@dataclass
class Inner:
    n_layers: int = 2
    name: str = "tiny"


@dataclass
class Recipe:
    model: Inner = field(default_factory=Inner)
    lr: float = 3e-4
    steps: int = 10


def test_yaml_then_overrides_are_merged_in_order(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  n_layers: 6\nlr: 0.001\n")
    cfg = load_config(Recipe, path, ["model.n_layers=4", "steps=7"])
    assert isinstance(cfg, Recipe) and isinstance(cfg.model, Inner)
    assert (cfg.model.n_layers, cfg.model.name, cfg.lr, cfg.steps) == (4, "tiny", 0.001, 7)


def test_unknown_key_names_the_full_key(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.n_layer"):
        load_config(Recipe, overrides=["model.n_layer=4"])
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  depth: 3\n")
    with pytest.raises(ConfigError, match=r"model\.depth"):
        load_config(Recipe, path)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"model\.n_layers"):
        load_config(Recipe, overrides=["model.n_layers=four"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"key\.sub=value"):
        load_config(Recipe, overrides=["steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Recipe, tmp_path / "nope.yaml")


def test_semantic_validation_is_a_config_error():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        load_config(ModelConfig, overrides=["n_heads=8", "n_kv_heads=3"])
    with pytest.raises(ConfigError, match="position"):
        load_config(ModelConfig, overrides=["position=wavelet"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(ModelConfig, overrides=["n_layers=3", "n_kv_heads=4"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(ModelConfig, tmp_path / "c.yaml")
    assert again == cfg


@dataclass
class WithModel:
    model: ModelConfig = field(default_factory=ModelConfig)


def test_nested_defaults_rederive_fields_the_recipe_did_not_set(tmp_path):
    # The default ModelConfig has d_model 768 / 12 heads, so head_dim 64, n_kv_heads 12 and d_ff 2048 were
    # derived; a recipe that changes the shape must get them derived again, not inherited.
    cfg = load_config(WithModel, data={"model": {"d_model": 192, "n_heads": 6}})
    assert (cfg.model.head_dim, cfg.model.n_kv_heads, cfg.model.d_ff) == (32, 6, 512)
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  d_model: 192\n  n_heads: 6\n  n_kv_heads: 2\n")
    cfg = load_config(WithModel, path, ["model.head_dim=48"])
    assert (cfg.model.head_dim, cfg.model.n_kv_heads, cfg.model.d_ff) == (48, 2, 512)


CURRICULUM_RECIPE = """
data:
  curriculum:
    - {name: short, tokens: 1024, seq_len: 16}
    - {name: long, seq_len: 32}
"""


def test_an_override_of_a_list_item_from_the_recipe_is_applied(tmp_path):
    from lmforge.train.config import TrainConfig

    path = tmp_path / "r.yaml"
    path.write_text(CURRICULUM_RECIPE)
    cfg = load_config(TrainConfig, path, ["data.curriculum[1].tokens=4096", "data.curriculum.0.seq_len=8"])
    assert [(s.name, s.tokens, s.seq_len) for s in cfg.data.curriculum] == [
        ("short", 1024, 8),
        ("long", 4096, 32),
    ]
    with pytest.raises(ConfigError, match=r"data\.curriculum.*no index 5"):
        load_config(TrainConfig, path, ["data.curriculum[5].tokens=4096"])
    with pytest.raises(ConfigError, match=r"data\.curriculum\[1\]\.tokenz"):
        load_config(TrainConfig, path, ["data.curriculum[1].tokenz=4096"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.dropout=x", "model.dropout"),  # a type error
        ("model.n_layer=2", "model.n_layer"),  # an unknown key
        ("model.n_heads=5", "model.d_model"),  # a nested __post_init__ check
    ],
)
def test_config_errors_name_the_full_key_without_omegaconf_internals(override, key):
    from lmforge.train.config import TrainConfig

    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, overrides=[override])
    message = str(info.value)
    assert message.startswith(f"{key}: ") and "\n" not in message
    assert not any(word in message for word in ("full_key", "reference_type", "object_type"))


def test_an_override_below_a_mapping_that_is_none_fills_it():
    cfg = load_config(ModelConfig, overrides=["rope_scaling.rope_type=linear", "rope_scaling.factor=2"])
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2}
