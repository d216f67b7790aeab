from pathlib import Path

import pytest

from lmforge.config import load_config
from lmforge.demo.config import DemoConfig
from lmforge.eval.runner import EvalConfig
from lmforge.tune.finetune import SFTConfig

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "demo"


@pytest.mark.parametrize(
    ("name", "schema"), [("sft.yaml", SFTConfig), ("eval.yaml", EvalConfig), ("own-corpus.yaml", DemoConfig)]
)
def test_demo_recipes_load_with_their_schema(name, schema):
    cfg = load_config(schema, RECIPES / name)
    assert isinstance(cfg, schema)
