"""Growing a model to an extended vocabulary: old rows untouched, new rows from their old sub-tokens."""

from __future__ import annotations

import pytest
import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.model.resize import resize_token_embeddings
from lmforge.tokenizer import TokenizerTrainConfig, train_tokenizer
from lmforge.tokenizer.extend import extend_tokenizer

ENGLISH = ["The quick brown fox jumps over the lazy dog.", "Packages are installed with apt."] * 30
KOREAN = ["데비안 패키지 설치 관리자 시스템", "한국어 문서 질문 답변 배포판 커널 설정"] * 40


@pytest.fixture(scope="module")
def tokenizers():
    base = train_tokenizer(ENGLISH, TokenizerTrainConfig(vocab_size=320, min_frequency=1))
    extended, added = extend_tokenizer(base, KOREAN, add=80)
    return base, extended, added


def build(vocab: int, tie: bool) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=vocab, d_model=32, n_layers=1, n_heads=4, d_ff=64, max_seq_len=64, tie_embeddings=tie
    )
    return Transformer(cfg).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_old_rows_and_logits_stay_and_new_rows_start_from_their_pieces(tokenizers, tie: bool) -> None:
    base, extended, added = tokenizers
    model = build(base.vocab_size, tie)
    ids = torch.tensor([base.encode("The quick brown fox")])
    with torch.no_grad():
        before = model(ids).logits
    old_embed = model.embed_tokens.weight.detach().clone()
    resize_token_embeddings(model, base, extended)
    assert model.cfg.vocab_size == extended.vocab_size
    assert model.embed_tokens.weight.shape[0] == model.lm_head.weight.shape[0] == extended.vocab_size
    torch.testing.assert_close(model.embed_tokens.weight[: base.vocab_size], old_embed)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after[..., : base.vocab_size], before)
    assert (model.lm_head.weight is model.embed_tokens.weight) == tie
    compared = 0
    for piece in added:
        new_id = extended.token_to_id(piece)
        text = extended.decode([new_id])
        if "\ufffd" in text:  # a piece that is not whole characters: compare through bytes elsewhere
            continue
        pieces = base.encode(text)
        torch.testing.assert_close(model.embed_tokens.weight[new_id], old_embed[pieces].mean(dim=0))
        compared += 1
    assert compared >= 5


def test_mean_init_and_refusing_a_tokenizer_that_moves_old_ids(tokenizers) -> None:
    base, extended, _ = tokenizers
    model = build(base.vocab_size, tie=False)
    mean = model.embed_tokens.weight.detach().mean(dim=0).clone()
    resize_token_embeddings(model, base, extended, init="mean")
    torch.testing.assert_close(model.embed_tokens.weight[-1], mean)
    other = train_tokenizer(KOREAN, TokenizerTrainConfig(vocab_size=330, min_frequency=1))
    with pytest.raises(ValueError, match="not an extension"):
        resize_token_embeddings(build(base.vocab_size, tie=False), base, other)


def test_the_commands_extend_a_tokenizer_then_resize_a_model(tokenizers, tmp_path, capsys) -> None:
    import json

    from lmforge.cli import main
    from lmforge.model.hf import load_pretrained, save_pretrained
    from lmforge.tokenizer import load_tokenizer

    base, _, _ = tokenizers
    folder = tmp_path / "model"
    save_pretrained(build(base.vocab_size, tie=False), folder)
    base.save(folder)
    corpus = tmp_path / "ko.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in KOREAN))
    assert (
        main(
            [
                "tokenizer",
                "extend",
                str(folder),
                "--corpus",
                str(corpus),
                "--add",
                "20",
                "-o",
                str(tmp_path / "tok"),
            ]
        )
        == 0
    )
    assert "added 20 of 20 pieces" in capsys.readouterr().out
    assert (
        main(["resize", str(folder), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "grown")])
        == 0
    )
    grown = load_pretrained(tmp_path / "grown")
    assert grown.cfg.vocab_size == base.vocab_size + 20 == load_tokenizer(tmp_path / "grown").vocab_size
