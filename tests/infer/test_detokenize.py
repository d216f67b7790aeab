import pytest
import torch

from lmforge.infer import EngineConfig, LLMEngine, SamplingParams
from lmforge.infer.detokenize import IncrementalDetokenizer
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import TokenizerTrainConfig, train_tokenizer

TEXTS = [
    "hello world, the quick brown fox",
    "naïve café déjà vu",
    "日本語のテキスト",
    "emoji 🦊🚀 mixed",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, TokenizerTrainConfig(vocab_size=300, min_frequency=1))


def _stream(tokenizer, ids, stop=None):
    detok = IncrementalDetokenizer(tokenizer, [], stop)
    deltas, stop_hit = [], None
    for i, token in enumerate(ids):
        stop_hit = detok.append(token)
        finished = stop_hit is not None or i == len(ids) - 1
        if finished and stop_hit is None:
            detok.flush()
        deltas.append(detok.take_delta(finished))
        if stop_hit is not None:
            break
    return deltas, stop_hit, detok.text


def test_multibyte_characters_are_never_split(tokenizer):
    text = "日本語 🦊🚀 café"
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some tokens hold part of a character
    deltas, _, full = _stream(tokenizer, ids)
    assert "" in deltas[:-1]  # ...so the stream had to wait for the rest of it
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == full == tokenizer.decode(ids) == text


def test_stop_string_spanning_tokens_cuts_the_text_and_never_leaks(tokenizer):
    ids = tokenizer.encode("hello world, the quick brown fox")
    deltas, stop, full = _stream(tokenizer, ids, stop=["ld, th", "zzz"])
    assert stop == "ld, th"
    assert full == "hello wor"
    assert "".join(deltas) == "hello wor"


def test_held_back_prefix_is_released_when_ruled_out(tokenizer):
    ids = tokenizer.encode("hello world")
    deltas, stop, full = _stream(tokenizer, ids, stop=["worm"])
    assert stop is None and "".join(deltas) == full == "hello world"
    # while "wor" could still become "worm", it was not streamed
    streamed = ""
    for d in deltas:
        streamed += d
        assert not streamed.endswith("wor") or streamed == "hello world"


def test_engine_stop_string_ends_the_request_with_the_text_before_it(tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=1, n_heads=2, max_seq_len=128)
    engine = LLMEngine(Transformer(cfg), tokenizer, EngineConfig(num_blocks=64, block_size=4))
    free = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, skip_special_tokens=False)
    text = engine.generate(["hello"], free)[0].outputs[0].text
    assert len(text) > 6
    stop = text[3:6]
    cut = text.index(stop)
    stopped = SamplingParams(
        max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop], skip_special_tokens=False
    )
    engine.add_request("s", "hello", stopped)
    streamed, last = "", None
    while engine.has_unfinished():
        for out in engine.step():
            streamed += out.outputs[0].new_text
            last = out.outputs[0]
    assert last.finish_reason == "stop" and last.stop_reason == stop
    assert last.text == streamed == text[:cut]


@pytest.mark.parametrize("kind", ["byte_bpe", "char_bpe", "wordpiece", "unigram"])
def test_deltas_add_up_to_the_full_decode_for_every_tokenizer_kind(kind):
    tokenizer = train_tokenizer(TEXTS, TokenizerTrainConfig(kind=kind, vocab_size=300, min_frequency=1))
    ids = tokenizer.encode("hello world, the quick brown fox naïve café")
    deltas, _, full = _stream(tokenizer, ids)
    assert "".join(deltas) == full == tokenizer.decode(ids)
