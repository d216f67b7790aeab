from pathlib import Path

import pytest
import yaml

from lmforge.config import load_config, to_dict
from lmforge.demo.config import DemoConfig
from lmforge.eval.runner import EvalConfig
from lmforge.tune.finetune import SFTConfig

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "demo"


@pytest.mark.parametrize(
    ("name", "schema"), [("sft.yaml", SFTConfig), ("eval.yaml", EvalConfig), ("own-corpus.yaml", DemoConfig)]
)
def test_demo_recipes_load_with_their_schema(name, schema):
    """Every value a recipe sets arrives in the config unchanged (no key ignored or overridden)."""
    written = yaml.safe_load((RECIPES / name).read_text())
    loaded = to_dict(load_config(schema, RECIPES / name))

    def check(expected: object, got: object, key: str) -> None:
        if isinstance(expected, dict):
            for sub, value in expected.items():
                check(value, got[sub], f"{key}.{sub}" if key else sub)
        elif isinstance(expected, list) and expected and isinstance(expected[0], dict):
            assert len(got) == len(expected), key
            for i, (want, have) in enumerate(zip(expected, got)):
                check(want, have, f"{key}[{i}]")
        else:
            assert got == expected, key

    check(written, loaded, "")
