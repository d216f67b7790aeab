import json

import pytest
import torch

from lmforge.tune.sft import (
    IGNORE_INDEX,
    SFTDataSource,
    SFTDataStats,
    SFTExample,
    collate,
    encode_chat,
    example_labels,
    load_sft_examples,
    pack_examples,
    record_to_messages,
)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12 + 34?"},
    {"role": "assistant", "content": "It is 46."},
    {"role": "user", "content": "Reverse: apple tree"},
    {"role": "assistant", "content": "tree apple"},
]


def trained_ids(example):
    return [i for i, t in zip(example.input_ids, example.trained) if t]


def test_exactly_assistant_content_and_turn_end_carry_loss(tokenizer):
    example = encode_chat(tokenizer, CHAT)
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(CHAT)
    im_end, eos = tokenizer.token_to_id("<|im_end|>"), tokenizer.eos_id
    # Independent reference: each reply tokenized alone, then the template's turn end (<|im_end|> + EOS).
    expected = []
    for reply in ("It is 46.", "tree apple"):
        expected += [*tokenizer.encode(reply), im_end, eos]
    assert trained_ids(example) == expected
    # Offsets check: every trained token lies inside an assistant reply or its end-of-turn tokens.
    text = tokenizer.apply_chat_template(CHAT)
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    learnt = "".join(text[s:e] for (s, e), t in zip(encoding.offsets, example.trained) if t)
    assert learnt == "It is 46.<|im_end|><|end_of_text|>tree apple<|im_end|><|end_of_text|>"


def test_next_token_labels_end_each_example_on_eos(tokenizer):
    example = encode_chat(tokenizer, CHAT[1:3])
    labels = example_labels(example)
    assert len(labels) == len(example)
    eos_positions = [t for t, label in enumerate(labels) if label == tokenizer.eos_id]
    assert eos_positions == [len(example) - 3]  # EOS is followed by the template's newline
    for t, label in enumerate(labels):
        assert label == IGNORE_INDEX or label == example.input_ids[t + 1]


def test_template_without_eos_gets_one_inserted(tokenizer):
    template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    original = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        example = encode_chat(tokenizer, CHAT[1:3])
    finally:
        tokenizer.chat_template = original
    # The turn's own text (reply + <|im_end|>) is learnt, then the inserted EOS.
    im_end = tokenizer.token_to_id("<|im_end|>")
    assert trained_ids(example) == [*tokenizer.encode("It is 46."), im_end, tokenizer.eos_id]


def test_prompt_completion_records_and_rejects(tmp_path, tokenizer):
    assert record_to_messages({"prompt": "p", "completion": "c", "system": "s"}) == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "p"},
        {"role": "assistant", "content": "c"},
    ]
    path = tmp_path / "sft.jsonl"
    lines = [
        json.dumps({"prompt": "What is 12 + 34?", "completion": "46"}),
        json.dumps({"messages": CHAT}),
        "not json",
        json.dumps({"messages": [{"role": "user", "content": "no reply"}]}),
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
        json.dumps({"prompt": "x" * 400, "completion": "late"}),
        json.dumps({"prompt": "hi", "completion": "apple tree " * 40}),
    ]
    path.write_text("\n".join(lines) + "\n")
    stats = SFTDataStats()
    examples = load_sft_examples([path], tokenizer, max_len=90, stats=stats)
    assert len(examples) == stats.examples == 3
    assert len(examples[2]) == 90
    assert stats.rejected == {
        "malformed_json": 1,
        "no assistant turn": 1,
        "every message needs a role among system/user/assistant": 1,
        "no assistant token within max_len": 1,
    }
    assert stats.truncated == 1
    assert stats.trained_tokens == sum(e.n_trained for e in examples)


def test_packing_restarts_positions_and_pad_equal_to_eos_keeps_eos(tokenizer):
    a, b = encode_chat(tokenizer, CHAT[1:3]), encode_chat(tokenizer, CHAT[3:5])
    length = len(a) + len(b) + 5
    batch = collate([[a, b]], pad_id=tokenizer.eos_id, length=length)
    n_a = len(a)
    assert batch["input_ids"][0, : len(a) + len(b)].tolist() == list(a.input_ids + b.input_ids)
    assert batch["position_ids"][0].tolist() == [*range(len(a)), *range(len(b)), 0, 0, 0, 0, 0]
    assert batch["segment_ids"][0].tolist() == [1] * n_a + [2] * len(b) + [0] * 5
    labels = batch["labels"][0].tolist()
    assert labels == example_labels(a) + example_labels(b) + [IGNORE_INDEX] * 5
    # The padding uses the EOS id, yet both real EOS targets keep their labels.
    assert labels.count(tokenizer.eos_id) == 2


def test_pack_examples_best_fit():
    def ex(n):
        return SFTExample(tuple(range(n)), (True,) * n)

    assert pack_examples([ex(6), ex(5), ex(4), ex(2)], seq_len=8) == [[0, 3], [1], [2]]
    # 3 fits rows with room 3 (row 1) and 4 (row 2): the tighter one wins.
    assert pack_examples([ex(6), ex(5), ex(4), ex(3)], seq_len=8) == [[0], [1, 3], [2]]
    with pytest.raises(ValueError):
        pack_examples([ex(9)], seq_len=8)


def _examples(n):
    return [SFTExample(tuple(range(1, 3 + i % 7)), (False,) + (True,) * (1 + i % 7)) for i in range(n)]


def test_data_source_resumes_exactly_and_covers_every_example():
    source = SFTDataSource(_examples(40), batch_size=4, seq_len=16, pad_id=0, pack=True, seed=5)
    stream = iter(source)
    first = [next(stream) for _ in range(3)]
    state = source.state_dict()
    expected = [next(stream) for _ in range(20)]
    resumed = SFTDataSource(_examples(40), batch_size=4, seq_len=16, pad_id=0, pack=True, seed=5)
    resumed.load_state_dict(state)
    stream = iter(resumed)
    for want in expected:
        got = next(stream)
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert first[0]["input_ids"].shape == (4, 16)
    epoch = source.epoch_batches(0)
    assert sorted(i for batch in epoch for row in batch for i in row) == list(range(40))


def test_length_grouping_reduces_padding():
    examples = _examples(400)

    def padding(source):
        total = 0
        for rows in source.epoch_batches(0):
            batch = source.make_batch(rows)
            total += int((batch["segment_ids"] == 0).sum())
        return total

    plain = SFTDataSource(examples, batch_size=8, seq_len=16, pad_id=0, pack=False, seed=1)
    grouped = SFTDataSource(
        examples, batch_size=8, seq_len=16, pad_id=0, pack=False, group_by_length=True, seed=1
    )
    assert padding(grouped) < padding(plain) / 3
    assert sorted(i for b in grouped.epoch_batches(0) for r in b for i in r) == list(range(400))
