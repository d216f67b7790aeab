import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lmforge.tune.preference import (
    PreferenceDataSource,
    PreferenceStats,
    collate_groups,
    load_preference_groups,
    ranking_pairs,
    record_to_group,
)

PAIR = {"prompt": "What is 12 + 34?", "chosen": "It is 46.", "rejected": "It is 45."}


def reply_text(tokenizer, seq):
    return tokenizer.decode([i for i, r in zip(seq.input_ids, seq.response) if r])


def test_pair_is_chat_templated_and_ends_on_the_reply_eos(tokenizer):
    group = record_to_group(PAIR, tokenizer, 100)
    assert group.pairs == ((0, 1),) and group.margins == (0.0,)
    chosen, rejected = group.sequences
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": PAIR["prompt"]}], add_generation_prompt=True
    )
    assert tokenizer.decode(chosen.input_ids) == prompt + "It is 46.<|im_end|><|end_of_text|>"
    assert reply_text(tokenizer, chosen) == "It is 46.<|im_end|><|end_of_text|>"
    assert reply_text(tokenizer, rejected) == "It is 45.<|im_end|><|end_of_text|>"
    assert chosen.input_ids[-1] == tokenizer.eos_id


def test_conversational_layout_learns_only_the_final_reply(tokenizer):
    record = {
        "prompt": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "more"},
        ],
        "chosen": [{"role": "assistant", "content": "tree"}],
        "rejected": "blue",
    }
    chosen, rejected = record_to_group(record, tokenizer, 100).sequences
    assert reply_text(tokenizer, chosen) == "tree<|im_end|><|end_of_text|>"
    assert reply_text(tokenizer, rejected) == "blue<|im_end|><|end_of_text|>"


def test_ranking_keeps_every_ordered_pair_in_one_group(tokenizer):
    assert ranking_pairs([2, 0, 1]) == [(1, 0), (2, 0), (1, 2)]
    assert ranking_pairs([0, 1, 0]) == [(0, 1), (2, 1)]  # ties give no pair
    record = {
        "prompt": "Name a colour",
        "responses": ["blue", "tree", "apple", "hello"],
        "ranking": [0, 1, 2, 3],
    }
    group = record_to_group(record, tokenizer, 100)
    assert len(group.sequences) == 4 and len(group.pairs) == 6  # C(4, 2)
    other = record_to_group(PAIR, tokenizer, 100)
    batch = collate_groups([other, group], tokenizer.pad_id)
    assert batch["input_ids"].shape[0] == 6  # each response encoded once
    assert batch["chosen_index"].tolist() == [0, 2, 2, 2, 3, 3, 4]
    assert batch["rejected_index"].tolist() == [1, 3, 4, 5, 4, 5, 5]
    for row, length in enumerate(batch["lengths"].tolist()):
        assert batch["input_ids"][row, length - 1] == tokenizer.eos_id
        assert (batch["input_ids"][row, length:] == tokenizer.pad_id).all()
        assert not batch["response_mask"][row, length:].any()


def test_bad_records_are_counted_and_written_with_their_reason(tmp_path, tokenizer):
    records = [
        PAIR,
        {**PAIR, "margin": 1.5},
        {"prompt": "x", "chosen": "same", "rejected": "same"},
        {"chosen": "a", "rejected": "b"},
        {"prompt": "x", "chosen": "a"},
        {"prompt": "x " * 200, "chosen": "a", "rejected": "b"},
        {"prompt": "x", "responses": ["a", "b"], "ranking": [0, 0]},
    ]
    path = tmp_path / "prefs.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records) + "{not json\n")
    stats = PreferenceStats()
    rejects = tmp_path / "run" / "rejects.jsonl"
    groups = load_preference_groups([path], tokenizer, 64, stats, rejects)
    assert [g.margins for g in groups] == [(0.0,), (1.5,)]
    assert stats.groups == 2 and stats.pairs == 2
    assert stats.rejected == {
        "identical chosen and rejected": 1,
        "missing prompt": 1,
        "missing rejected": 1,
        "over max_len": 1,
        "the ranking has fewer than two distinct ranks": 1,
        "malformed_json": 1,
    }
    written = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert len(written) == 6
    assert (
        written[0]["reason"] == "identical chosen and rejected" and written[0]["record"]["chosen"] == "same"
    )
    assert all(w["where"].startswith(str(path)) for w in written)


def test_parquet_and_resumable_source(tmp_path, tokenizer):
    path = tmp_path / "prefs.parquet"
    rows = [{"prompt": f"What is {i} + 1?", "chosen": str(i + 1), "rejected": str(i)} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    groups = load_preference_groups([path], tokenizer, 64)
    assert len(groups) == 5
    source = PreferenceDataSource(groups, batch_size=2, pad_id=tokenizer.pad_id, seed=3)
    first = [next(source) for _ in range(4)]
    state = source.state_dict()
    after = [next(source) for _ in range(3)]
    resumed = PreferenceDataSource(groups, batch_size=2, pad_id=tokenizer.pad_id)
    resumed.load_state_dict(state)
    for a, b in zip(after, [next(resumed) for _ in range(3)]):
        assert torch.equal(a["input_ids"], b["input_ids"])
    assert sum(b["chosen_index"].numel() for b in first[:3]) == 5  # one epoch: every pair once


def test_align_metrics_log_per_step_means_and_forget_rolled_back_steps(tmp_path):
    from lmforge.tune.align_log import AlignMetrics

    metrics = AlignMetrics(tmp_path / "m.jsonl", every_steps=2)
    for step in range(5):  # the hook runs before each step's micro-batch, the objective adds after it
        metrics.hook(step, {})
        metrics.add({"accuracy": torch.tensor(float(step))}, 1)
    metrics.hook(2, {})  # rolled back to step 2
    metrics.add({"accuracy": torch.tensor(9.0)}, 1)
    metrics.hook(3, {})
    metrics.hook(4, {})
    read = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert read == [{"step": 2, "accuracy": 0.5}, {"step": 4, "accuracy": 9.0}]
