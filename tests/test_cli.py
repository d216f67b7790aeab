"""``lmforge``: known errors as one line (exit 2 for config, 1 for run errors), --debug, --print-config,
stage-specific override examples, ``info --list``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lmforge.cli import build_parser, main
from lmforge.config import ConfigError
from lmforge.train.checkpoint import list_checkpoints
from tests.train.conftest import make_shards, tiny_data

OMEGACONF_INTERNALS = ("full_key", "reference_type", "object_type", "Traceback")


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmforge: error: "), err
    assert not any(word in err for word in OMEGACONF_INTERNALS), err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "key"),
    [
        (["train", "optim.lr=nan"], "optim.lr"),
        (["train", "optim.lr=inf"], "optim.lr"),
        (["train", "model.dropout=x"], "model.dropout"),
        (["train", "model.n_layer=2"], "model.n_layer"),
        (["train", "data.seq_len=4096"], "data.seq_len"),
        (["info", "no-such-preset"], "no-such-preset"),
    ],
)
def test_config_errors_are_one_line_and_exit_2(argv: list[str], key: str, capsys) -> None:
    assert main(argv) == 2
    assert key in one_error_line(capsys.readouterr().err)


def test_debug_shows_the_traceback_instead(capsys) -> None:
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        main(["--debug", "train", "optim.lr=nan"])


def test_run_errors_are_one_line_and_exit_1(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    missing = ["train", f"run_dir={run}", f"data.shards=[{tmp_path / 'nope'}]", "model.max_seq_len=1024"]
    assert main(missing) == 1
    assert "nope" in one_error_line(capsys.readouterr().err)
    assert not run.exists()

    # a TrainingError: every checkpoint of the run is damaged
    recipe = tmp_path / "recipe.yaml"
    shards = make_shards(tmp_path / "shards")
    data = tiny_data(run, shards, max_steps=2, **{"checkpoint.every_steps": 1})
    recipe.write_text(yaml.safe_dump(data))
    assert main(["train", "--config", str(recipe)]) == 0
    for folder in list_checkpoints(run / "checkpoints"):
        (folder / "trainer.pt").write_bytes(b"damaged")
    capsys.readouterr()
    assert main(["train", "--config", str(recipe)]) == 1
    assert "restart_if_damaged" in one_error_line(capsys.readouterr().err)


def test_print_config_prints_the_resolved_config_and_exits_0(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("max_steps: 7\ndata:\n  curriculum:\n    - {name: a, tokens: 64}\n    - {name: b}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", str(recipe), "--print-config", "data.curriculum[1].seq_len=32"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["max_steps"] == 7 and printed["optim"]["lr"] == 3e-4  # recipe and defaults
    assert [stage["seq_len"] for stage in printed["data"]["curriculum"]] == [0, 32]  # and the override


def subcommand_help(*names: str) -> str:
    parser = build_parser()
    for name in names:
        action = next(
            a for a in parser._actions if a.dest in ("command", "tokenizer_command", "shards_command")
        )
        parser = action.choices[name]
    return parser.format_help()


@pytest.mark.parametrize(
    ("stage", "example"),
    [
        (("train",), "max_steps=2000"),
        (("doremi",), "proxy_steps=500"),
        (("sft",), "optim.lr=2e-5"),
        (("tokenizer", "train"), "vocab_size=8000"),
        (("eval",), "model=runs/sft/model"),
        (("demo",), "pretrain.steps=200"),
    ],
)
def test_each_stage_shows_its_own_override_example(stage: tuple[str, ...], example: str) -> None:
    text = " ".join(subcommand_help(*stage).split())
    assert example in text and "--print-config" in text
    if stage[0] != "demo":
        assert "model.n_layers=4" not in text


def test_info_list_shows_the_presets_with_parameter_counts(capsys) -> None:
    assert "--list" in subcommand_help("info")
    assert main(["info", "--list", "--json"]) == 0
    presets = json.loads(capsys.readouterr().out)
    assert presets["gpt2"]["total"] == 124_439_808 and "tiny-llama" in presets


def test_a_missing_extra_is_named_with_the_command_that_installs_it(monkeypatch, capsys) -> None:
    import sys

    from lmforge.cli import missing_extra

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if the serve extra were not installed
    assert main(["serve", "some-model-folder"]) == 1
    err = capsys.readouterr().err
    assert "needs the 'serve' extra (uvicorn is not installed): pip install 'lmforge[serve]'" in err
    assert "Traceback" not in err
    assert missing_extra(ModuleNotFoundError("No module named 'foo'", name="foo")) is None  # bugs still raise
    assert "lmforge[data]" in missing_extra(ModuleNotFoundError("x", name="pyarrow.parquet"))
