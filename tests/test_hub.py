"""Model folders by Hub id, resolved in a Hugging Face cache laid out by the test (never the network)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.hub import HubError, parse_hub_id, resolve_model_dir
from lmforge.model import ModelConfig, Transformer
from lmforge.model.hf import ModelLoadError, load_pretrained, save_pretrained
from lmforge.tokenizer import TokenizerTrainConfig, load_tokenizer, train_tokenizer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache holding org/tiny at COMMIT (branch main), as huggingface_hub lays it out; offline."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    snapshot = repo / "snapshots" / COMMIT
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=4, d_ff=64, max_seq_len=32)
    save_pretrained(Transformer(cfg), snapshot)
    train_tokenizer(["hello hub world"] * 10, TokenizerTrainConfig(vocab_size=300, min_frequency=1)).save(
        snapshot
    )
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return snapshot


def test_hub_ids_are_told_from_paths() -> None:
    assert parse_hub_id("org/name") == ("org/name", None)
    assert parse_hub_id("Qwen/Qwen2.5-0.5B-Instruct@v1.0") == ("Qwen/Qwen2.5-0.5B-Instruct", "v1.0")
    for not_an_id in ("./org/name", "/abs/path", "name", "a/b/c", "org//name"):
        assert parse_hub_id(not_an_id) is None, not_an_id


def test_a_local_folder_wins_over_an_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert resolve_model_dir("org/name") == Path("org/name")


def test_a_cached_id_loads_model_and_tokenizer_offline(hub_cache: Path) -> None:
    assert resolve_model_dir("org/tiny") == hub_cache
    assert resolve_model_dir(f"org/tiny@{COMMIT}") == hub_cache
    model = load_pretrained("org/tiny")
    assert model.cfg.d_model == 32
    assert load_tokenizer("org/tiny").encode("hello") == load_tokenizer(hub_cache).encode("hello")


def test_an_uncached_id_offline_is_a_clear_error(hub_cache: Path) -> None:
    with pytest.raises(HubError, match=r"not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        resolve_model_dir("org/missing")
    with pytest.raises(ModelLoadError, match="org/missing"):
        load_pretrained("org/missing")
    with pytest.raises(HubError, match="model folder not found"):
        resolve_model_dir("no-such-folder")


def test_commands_take_an_id(hub_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lmforge.cli import main

    assert main(["info", "org/tiny", "--json"]) == 0
    assert '"model": "org/tiny"' in capsys.readouterr().out
    assert main(["generate", "org/tiny", "--prompt", "hello", "--max-tokens", "3"]) == 0
