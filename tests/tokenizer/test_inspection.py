import pytest

from lmforge.tokenizer import TOKENIZER_KINDS, Tokenizer, TokenizerTrainConfig, train_tokenizer
from lmforge.tokenizer.inspection import fallback_token_ids, inspect_texts, is_lossless

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 2024!",
    "안녕하세요, 세계! 한국어 문장을 토큰화합니다.",
    "你好，世界。这是一个中文句子。",
    "def add(a, b):\n    return a + b  # adds",
    "Ｆｕｌｌ-width ＡＢＣ and ligature ﬁ",
]


def corpus() -> list[str]:
    return TEXTS * 20


@pytest.fixture(scope="module")
def byte_bpe() -> Tokenizer:
    return train_tokenizer(corpus(), TokenizerTrainConfig(kind="byte_bpe", vocab_size=600, min_frequency=1))


def test_fallback_ids_and_inspect(byte_bpe: Tokenizer) -> None:
    fallback = fallback_token_ids(byte_bpe)
    # the lone byte 0xEB (first byte of a 3-byte Hangul character) is a fallback token, 'a' is not
    assert byte_bpe.token_to_id("ë") in fallback  # GPT-2 byte map: 0xEB -> 'ë'
    assert byte_bpe.token_to_id("a") not in fallback
    stats = inspect_texts(byte_bpe, [("en", "the quick brown fox"), ("ko", "뷁뷁"), ("en", "lazy dog")])
    assert stats["en"].docs == 2 and stats["ko"].docs == 1
    assert stats["en"].fallback_share == 0.0
    assert stats["ko"].fallback_share == 1.0  # unseen syllables are byte tokens only
    assert stats["ko"].bytes == 6 and stats["ko"].tokens == 6
    assert stats["en"].round_trip_rate == 1.0
    # English: 27 bytes over the tokens that one-at-a-time encoding gives (batching must not change them)
    en_tokens = sum(len(byte_bpe.encode(t)) for t in ("the quick brown fox", "lazy dog"))
    assert stats["en"].bytes == 27 and stats["en"].tokens == en_tokens
    assert stats["en"].bytes_per_token == pytest.approx(27 / en_tokens)
    assert stats["en"].to_dict()["bytes_per_token"] == round(27 / en_tokens, 4)


def test_wordpiece_inspect_reports_lossy_round_trip_and_unknowns() -> None:
    tok = train_tokenizer(corpus(), TokenizerTrainConfig(kind="wordpiece", vocab_size=400, min_frequency=1))
    stats = inspect_texts(tok, [("x", "hello   world"), ("x", "뷁")])["x"]
    assert stats.round_trip_rate == 0.0  # WordPiece drops repeated spaces; '뷁' becomes the unknown token
    assert stats.fallback_tokens >= 1


def test_only_byte_level_bpe_without_normalizer_is_lossless_by_construction(byte_bpe: Tokenizer) -> None:
    assert is_lossless(byte_bpe)
    nfkc = train_tokenizer(
        corpus(), TokenizerTrainConfig(vocab_size=300, min_frequency=1, normalization="nfkc")
    )
    assert not is_lossless(nfkc)
    for kind in (k for k in TOKENIZER_KINDS if k != "byte_bpe"):
        assert not is_lossless(train_tokenizer(corpus(), TokenizerTrainConfig(kind=kind, vocab_size=300)))
