"""Vocabulary extension: new pieces for a new language, every old id kept, loadable by transformers."""

from __future__ import annotations

import random

import pytest

from lmforge.tokenizer import TokenizerTrainConfig, load_tokenizer, train_tokenizer
from lmforge.tokenizer.extend import ExtendError, extend_tokenizer, tokens_per_char

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "Packages are installed with the package manager, and upgrades keep the configuration.",
    "A tokenizer splits text into pieces that a model reads as numbers.",
] * 30
KOREAN_WORDS = [
    "데비안",
    "패키지",
    "설치",
    "관리자",
    "시스템",
    "업그레이드",
    "설정",
    "파일",
    "사용자",
    "한국어",
    "문서",
    "질문",
    "답변",
    "배포판",
    "커널",
]


def korean(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(KOREAN_WORDS) for _ in range(rng.randint(5, 12))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def base():
    return train_tokenizer(ENGLISH, TokenizerTrainConfig(vocab_size=400, min_frequency=1))


def test_new_pieces_compress_the_new_language_and_keep_every_old_id(base) -> None:
    extended, added = extend_tokenizer(base, korean(300, 0), add=60)
    assert len(added) == 60 and extended.vocab_size == base.vocab_size + 60
    old = base.backend.get_vocab(with_added_tokens=True)
    new = extended.backend.get_vocab(with_added_tokens=True)
    assert all(new[t] == i for t, i in old.items())
    assert sorted(new[p] for p in added) == list(range(base.vocab_size, base.vocab_size + 60))
    held_out = korean(50, 1)
    before, after = tokens_per_char(base, held_out), tokens_per_char(extended, held_out)
    assert after < 0.6 * before, (before, after)
    for text in held_out[:10]:
        assert extended.decode(extended.encode(text)) == text
    for text in ENGLISH[:3]:  # text the new merges never touch encodes as before
        assert extended.encode(text) == base.encode(text)
    assert extended.eos_id == base.eos_id and extended.chat_template == base.chat_template


def test_the_extended_folder_loads_in_transformers_with_the_same_ids(base, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    extended, _ = extend_tokenizer(base, korean(300, 0), add=40)
    extended.save(tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = korean(1, 7)[0] + " The quick fox."
    assert hf(text, add_special_tokens=False)["input_ids"] == load_tokenizer(tmp_path / "tok").encode(text)


def test_fewer_pieces_than_asked_when_the_text_runs_out_and_clear_errors(base) -> None:
    _, added = extend_tokenizer(base, ["가나"] * 5, add=500)
    assert 0 < len(added) < 500
    with pytest.raises(ExtendError, match="add"):
        extend_tokenizer(base, ["x"], add=0)
    wordpiece = train_tokenizer(
        ENGLISH, TokenizerTrainConfig(kind="wordpiece", vocab_size=300, min_frequency=1)
    )
    with pytest.raises(ExtendError, match="only BPE"):
        extend_tokenizer(wordpiece, ["x"], add=5)
